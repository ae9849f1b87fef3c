"""What a CUDA graph captures, recorded on CPU: the aten ops of one forward with the tensors they read,
replayable later as a graph replays (the same ops on the same tensors, whatever Python would decide now).

A tensor an op reads is either *produced* inside the recording (an earlier op's output, by position) or
*external* (a weight, a KV cache, a step buffer, a per-slot table: it must stay at the same address
for a graph to read its current values). `signature()` names every op with its external tensors'
addresses and its Python arguments, so two recordings of the same forward compare equal exactly when
a graph captured by the first would replay the second.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default"}
"""Ops that read a device value on the host: a graph cannot capture them."""


class _Produced:
    __slots__ = ("op", "index")

    def __init__(self, op: int, index: int):
        self.op, self.index = op, index


class RecordedForward(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []  # (func, args, kwargs) with tensors as _Produced or the external tensor
        self._origin: dict[int, _Produced] = {}
        self._held: list[torch.Tensor] = []  # every produced tensor: ids stay unique while recording
        self.output: torch.Tensor | None = None
        self._output_ref: _Produced | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        refs = tree_map(self._ref, (args, kwargs))
        out = func(*args, **kwargs)
        op = len(self.ops)
        self.ops.append((func, *refs))
        for index, tensor in enumerate(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            self._origin[id(tensor)] = _Produced(op, index)
            self._held.append(tensor)
        return out

    def _ref(self, value):
        if isinstance(value, torch.Tensor):
            return self._origin.get(id(value), value)
        return value

    def record(self, forward: Callable[[], torch.Tensor]) -> tuple["RecordedForward", torch.Tensor]:
        """Run `forward` once, recording it; returns (self, its output), as `DecodeGraphs.capture` takes."""
        with self:
            output = forward()
        self.output = output
        self._output_ref = self._origin[id(output)]
        return self, output

    def replay(self) -> None:
        """Run the recorded ops again on the external tensors' current values; the output tensor is
        rewritten in place, as a CUDA graph's is."""
        values: list[list[torch.Tensor]] = []

        def resolve(value):
            return values[value.op][value.index] if isinstance(value, _Produced) else value

        for func, args, kwargs in self.ops:
            out = func(*tree_map(resolve, args), **tree_map(resolve, kwargs))
            values.append([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        self.output.copy_(values[self._output_ref.op][self._output_ref.index])

    def host_reads(self) -> list[str]:
        return [str(func) for func, _, _ in self.ops if str(func) in HOST_READS]

    def signature(self) -> list[tuple]:
        def describe(value):
            if isinstance(value, _Produced):
                return ("produced", value.op, value.index)
            if isinstance(value, torch.Tensor):
                return ("external", value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                        tuple(value.stride()), str(value.dtype))
            return repr(value)

        return [(str(func), tuple(describe(v) for v in tree_flatten((args, kwargs))[0]))
                for func, args, kwargs in self.ops]


def recorder() -> Callable[[Callable[[], torch.Tensor]], tuple[RecordedForward, torch.Tensor]]:
    """A `DecodeGraphs.capture` recorder that records on any device instead of capturing CUDA graphs."""
    return lambda forward: RecordedForward().record(forward)
