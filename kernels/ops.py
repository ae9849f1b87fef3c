"""LoRA shrink/expand dispatch: Triton on CUDA, the C kernel or the torch segment loop on CPU.

    LORAPLEX_LORA_BACKEND=triton|native|torch|reference   forces a backend (read on every call; the
                                                          engine's layers read it once per step)

``native`` is the C kernel of ``native.py``: CPU ``lora_apply`` only (shrink and expand of a group in
one call), float32 activations with float32 or bfloat16 pools. Unforced, ``lora_apply`` on CPU
float32 uses it for steps whose segments are all at most ``NATIVE_MAX_SEGMENT`` tokens (decode: one
matrix-vector product per adapter, read at memory bandwidth; prefill chunks) and the torch segment
path for longer segments (long prefills, where torch's matmul is a well-tuned GEMM); bfloat16 pools
(``--adapter-dtype bfloat16``) always take the C kernel. ``lora_shrink``/``lora_expand`` on CPU
always use the torch path.

Semantics (all backends; r = ranks[i, a], a = slot of token t, −1 = no adapter):

    shrink:  v[i, t, :r] = x[t] @ A[i, a, :r]ᵀ                                   fp32 accumulate, fp32 v
    expand:  y[t, off_i : off_i + w_i] += scalings[i, a] · v[i, t, :r] @ B_t[a, :r, off_i : off_i + w_i]

Layouts: A [num_slices, S, max_rank, in] and B_t [S, max_rank, out_total] (lora_B transposed,
slices side by side in columns) are stacked weight pools indexed by device slot; only the first r
rank rows of a slot are ever read, so what the padding holds never matters. ranks [num_slices, S]
int32, 0 <= r <= max_rank (0: the adapter does not target the slice, no work; scalings there are
never read), scalings [num_slices, S] fp32. Tokens with slot −1 and rank-0 slices leave y
bit-for-bit untouched. Shrink writes only ``v[i, t, :r]`` of tokens with an adapter; the rest of v
is left as it was or zeroed (Triton with split_k > 1 clears v first).

The Triton backend never syncs with the host and allocates nothing that depends on the data
(``lora_apply`` with ``LoRAMeta.allocate(..., max_rank=...)`` allocates nothing at all), so a step
can be captured in a CUDA graph; ``meta.update`` runs before capture/replay, outside the graph.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from . import native, reference, torch_ops
from .meta import LoRAMeta

BACKEND_ENV = "LORAPLEX_LORA_BACKEND"
BACKENDS = ("triton", "native", "torch", "reference")
# Longest segment (tokens of one adapter in a step) that the unforced CPU float32 lora_apply gives to
# the C kernel; longer ones go to torch's matmul, which is the better GEMM from there on
# (docs/benchmarks.md has the numbers).
NATIVE_MAX_SEGMENT = 128


def _forced_backend() -> str:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    return forced


def select_backend(device: torch.device) -> str:
    """``$LORAPLEX_LORA_BACKEND`` if set, else "triton" for CUDA tensors and "torch" otherwise
    (``lora_apply`` may still pick "native" on CPU, see the module doc)."""
    return _forced_backend() or ("triton" if device.type == "cuda" else "torch")


def _max_segment(meta: LoRAMeta) -> int:
    """Longest segment of this step (cached on meta for its current segment list)."""
    segments = meta.segments
    cached = meta.__dict__.get("_max_segment")
    if cached is not None and cached[0] is segments:
        return cached[1]
    longest = max((length for _, _, length in segments), default=0)
    meta.__dict__["_max_segment"] = (segments, longest)
    return longest


def apply_backend(x, y, A, B_t, meta) -> str:
    """The backend `lora_apply` runs for these tensors and this step's layout."""
    forced = _forced_backend()
    if forced == "native":
        if not native.supports(x, y, A, B_t):
            raise ValueError(f"{BACKEND_ENV}=native runs float32 CPU tensors only, got {x.dtype} on {x.device}")
        return "native"
    if forced:
        return forced
    if y.device.type == "cuda":
        return "triton"
    if meta.segments is not None and native.supports(x, y, A, B_t) and native.available():
        # bfloat16 pools with float32 activations: only the C kernel takes them
        if A.dtype != x.dtype or _max_segment(meta) <= NATIVE_MAX_SEGMENT:
            return "native"
    return "torch"


def lora_shrink(
    x: torch.Tensor,         # [T, in_features], fp16/bf16/fp32
    A: torch.Tensor,         # [num_slices, S, max_rank, in_features], x's dtype, contiguous
    ranks: torch.Tensor,     # [num_slices, S] int32
    meta: LoRAMeta,          # updated for this step's T tokens
    out: torch.Tensor | None = None,  # [num_slices, T, max_rank] fp32 (a view with unit last stride is fine)
) -> torch.Tensor:
    """v = shrink(x); returns ``out`` (allocated when None)."""
    backend = select_backend(x.device)
    if backend == "triton":
        from .shrink import triton_shrink
        return triton_shrink(x, A, ranks, meta, out=out)
    if backend in ("torch", "native"):  # native fuses whole groups only (lora_apply)
        return torch_ops.torch_shrink(x, A, ranks, meta, out=out)
    torch_ops._check_shrink(x, A, ranks, meta, out)
    return reference.shrink_reference(x, A, ranks, meta.slots, out=out)


def lora_expand(
    v: torch.Tensor,         # [num_slices, T, max_rank], fp32 or B_t's dtype
    B_t: torch.Tensor,       # [S, max_rank, out_total], y's dtype, contiguous
    ranks: torch.Tensor,     # [num_slices, S] int32
    scalings: torch.Tensor,  # [num_slices, S] fp32
    meta: LoRAMeta,
    y: torch.Tensor,         # [T, out_total], updated in place
    slice_offsets: Sequence[int] | None = None,  # None: equal widths side by side
    slice_widths: Sequence[int] | None = None,
) -> torch.Tensor:
    """y += expand(v), in place; returns y."""
    backend = select_backend(y.device)
    if backend == "triton":
        from .expand import triton_expand
        return triton_expand(v, B_t, ranks, scalings, meta, y, slice_offsets, slice_widths)
    if backend in ("torch", "native"):
        return torch_ops.torch_expand(v, B_t, ranks, scalings, meta, y, slice_offsets, slice_widths)
    from .checks import resolve_slices
    torch_ops._check_expand(v, B_t, ranks, scalings, meta, y)
    offsets, widths = resolve_slices(v.shape[0], y.shape[1], slice_offsets, slice_widths)
    return reference.expand_reference(v, B_t, ranks, scalings, meta.slots, y, offsets, widths)


def lora_apply(
    x: torch.Tensor,         # [T, in_features]
    y: torch.Tensor,         # [T, out_total], the base layer's output; updated in place
    A: torch.Tensor,         # [num_slices, S, max_rank, in_features]
    B_t: torch.Tensor,       # [S, max_rank, out_total]
    ranks: torch.Tensor,     # [num_slices, S] int32
    scalings: torch.Tensor,  # [num_slices, S] fp32
    meta: LoRAMeta,
    slice_offsets: Sequence[int] | None = None,
    slice_widths: Sequence[int] | None = None,
    v: torch.Tensor | None = None,  # scratch [num_slices, T, max_rank] fp32; default meta.workspace(...)
) -> torch.Tensor:
    """y += LoRA(x) for every token's adapter: shrink then expand. Returns y."""
    if apply_backend(x, y, A, B_t, meta) == "native":
        return native.lora_apply(x, y, A, B_t, ranks, scalings, meta, slice_offsets, slice_widths)
    if v is None:
        v = meta.workspace(A.shape[0], A.shape[2])
    lora_shrink(x, A, ranks, meta, out=v)
    return lora_expand(v, B_t, ranks, scalings, meta, y, slice_offsets, slice_widths)
