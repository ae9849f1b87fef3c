"""The LoRA op as functions of loose tensors, for the kernel tests: each call picks its backend
(``backend.select``) from the tensors; the model layer holds one backend instead, chosen at start-up.

    LORAPLEX_LORA_BACKEND=triton|native|torch   forces the LoRA op (read on every call)

``native`` is the C kernel (``kernels/cpu/``): ``lora_apply`` only (shrink and expand of a group in one
call), CPU float32 activations with float32 or bfloat16 pools; unforced, CPU float32 steps take it as
``kernels/cpu/backend.py`` says. ``lora_shrink``/``lora_expand`` on CPU always use the torch path.

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

from typing import Sequence

import torch

from . import torch_ops
from .backend import Pool, forced_lora_op, select
from .meta import LoRAMeta


def select_backend(device: torch.device) -> str:
    """``$LORAPLEX_LORA_BACKEND`` if set, else "triton" for CUDA tensors and "torch" otherwise
    (``lora_apply`` may still pick "native" on CPU, see the module doc)."""
    return forced_lora_op() or ("triton" if device.type == "cuda" else "torch")


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
        from .triton.shrink import triton_shrink
        return triton_shrink(x, A, ranks, meta, out=out)
    return torch_ops.torch_shrink(x, A, ranks, meta, out=out)  # native fuses whole groups only (lora_apply)


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
        from .triton.expand import triton_expand
        return triton_expand(v, B_t, ranks, scalings, meta, y, slice_offsets, slice_widths)
    return torch_ops.torch_expand(v, B_t, ranks, scalings, meta, y, slice_offsets, slice_widths)


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
    backend = select(y.device, x.dtype, A.dtype if A.dtype != x.dtype and x.device.type == "cpu" else None)
    pool = Pool(A, B_t, ranks, scalings, y.shape[1], slice_offsets, slice_widths)
    return backend.lora_apply(x, y, pool, None, backend.begin_step(meta), v)
