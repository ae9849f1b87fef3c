"""A step's metadata on its way to the device: written on the host, sent in one copy.

The runner lays every per-step index array (token ids, positions, KV slots, block tables, LoRA
segments and tiles) into one host buffer, pinned on CUDA, and `send` issues a single non-blocking
copy of the used bytes to a device twin; the arrays are read on the device as views of that twin.
Worked example: `begin(64)`, `put([5, 6], torch.int64)` -> bytes [0, 16), `put(int32 [3])` -> bytes
[16, 28) (each array starts on 8 bytes), `send()` copies bytes [0, 28) once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

log = logging.getLogger(__name__)

ALIGN = 8


@dataclass
class StepAttachment:
    """Host arrays that ride along with a step's metadata in its one copy (the sampler's per-row
    parameters): `host` is given, `device` is filled by the runner with views in the same order,
    valid until the next step begins."""

    host: list[torch.Tensor]
    device: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes the arrays take in a step buffer, alignment included."""
        return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in self.host)

    def put(self, buffers: "StepBuffers") -> None:
        self.device = [buffers.put(t, t.dtype) for t in self.host]


class StepBuffers:
    def __init__(self, device: torch.device, nbytes: int = 1 << 16):
        self.device = device
        self.pinned = device.type == "cuda"
        self._allocate(nbytes)
        self.used = 0
        self._sent: torch.cuda.Event | None = None
        """Recorded after the last copy: its host bytes may be rewritten once it has run."""

    def _allocate(self, nbytes: int) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.table = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def reserve(self, nbytes: int) -> None:
        """Hold at least `nbytes` from now on (start-up: steps within it never allocate)."""
        if nbytes > self.host.numel():
            self._allocate(nbytes)

    def begin(self, bound: int) -> None:
        """Start a step whose arrays take at most `bound` bytes (their alignment included)."""
        if self._sent is not None:
            # the previous copy has run by now (the step after it read its sampled tokens): no wait
            self._sent.synchronize()
            self._sent = None
        if bound > self.host.numel():
            log.warning("a step needs %d bytes of metadata, past the %d reserved: the step buffer grows",
                        bound, self.host.numel())
            self._allocate(max(bound, 2 * self.host.numel()))
        self.used = 0

    def put(self, values: Sequence[int] | torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Write `values` into the host buffer; returns the device view they will occupy after `send`."""
        source = torch.as_tensor(values, dtype=dtype)
        start = -(-self.used // ALIGN) * ALIGN
        end = start + source.numel() * source.element_size()
        if end > self.host.numel():
            raise RuntimeError(f"step metadata needs {end} bytes, more than the {self.host.numel()} reserved by begin()")
        self.host[start:end].view(dtype).copy_(source.flatten())
        self.used = end
        return self.table[start:end].view(dtype)

    def seek(self, offset: int) -> None:
        """Let the next `put` start at byte `offset` (a caller with a fixed layout of its own)."""
        self.used = offset

    def send(self, nbytes: int | None = None) -> None:
        """The step's one host -> device copy of bytes [0, nbytes) (default: what `put` wrote), asynchronous
        on CUDA."""
        nbytes = self.used if nbytes is None else nbytes
        self.table[:nbytes].copy_(self.host[:nbytes], non_blocking=self.pinned)
        if self.pinned:
            self._sent = torch.cuda.Event()
            self._sent.record()
