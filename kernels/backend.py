"""One backend per platform for the model layer's kernels, chosen once when the runner builds the model.

The model layer (server/adapters/lora.py, server/model/decoder.py) calls a `Backend` for

- the base projections of a fused group: ``prepare_linear`` once at wrap time (a backend may keep the
  weight in its own layout), then ``Projection.__call__`` per step;
- the LoRA op: ``prepare_pool`` once per stacked weight pool, ``begin_step`` once per step (whatever the
  backend derives from the step's ``LoRAMeta``), ``lora_apply`` per projection group;
- the element-wise steps of a Llama-shaped decoder layer: ``add_rms_norm``, ``rope_store``;

and never branches on the platform itself. Backends:

    Backend        torch ops on any device: the LoRA op through ``torch_ops`` (or the Triton kernels when
                   $LORAPLEX_LORA_BACKEND says so); the fallback of every platform
    TritonBackend  CUDA: the LoRA op through the Triton kernels (kernels/triton/)
    TorchCPUBackend, CPUBackend   CPU float32, without and with the C kernels (kernels/cpu/backend.py)

``select`` picks one from the device, the model's dtype and $LORAPLEX_LORA_BACKEND, which forces the LoRA
op only (triton|native|torch; native needs the C kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import devices, torch_ops
from .meta import LoRAMeta
from .triton import configs

BACKEND_ENV = "LORAPLEX_LORA_BACKEND"
LORA_OPS = ("triton", "native", "torch")


def forced_lora_op() -> str:
    """$LORAPLEX_LORA_BACKEND, normalised ("" when unset); raises on an unknown value."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in LORA_OPS:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(LORA_OPS)}")
    return forced


class LoRAPoolTensors(Protocol):
    """The stacked weights of one projection group (server/adapters/lora.py's `LoRAPool`)."""

    a: torch.Tensor            # [num_slices, S, max_rank, in_features]
    b_t: torch.Tensor          # [S, max_rank, out_total]
    ranks: torch.Tensor        # [num_slices, S] int32
    scale: torch.Tensor        # [num_slices, S] fp32
    out_total: int
    slice_offsets: Sequence[int]
    slice_widths: Sequence[int]


@dataclass
class Pool:
    """A pool given as loose tensors (the functional `ops.lora_apply`)."""

    a: torch.Tensor
    b_t: torch.Tensor
    ranks: torch.Tensor
    scale: torch.Tensor
    out_total: int
    slice_offsets: Sequence[int] | None
    slice_widths: Sequence[int] | None


class Projection:
    """x @ weightᵀ + bias for one fused group's weight [out_total, in], in the plain layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [M, in] -> [M, out_total]
        return F.linear(x, self.weight, self.bias)

    def columns(self, x: torch.Tensor, offset: int, width: int) -> torch.Tensor:
        """Output columns [offset, offset + width) only (one projection of the group)."""
        bias = None if self.bias is None else self.bias[offset : offset + width]
        return F.linear(x, self.weight[offset : offset + width], bias)

    def dense(self) -> torch.Tensor:
        """The weight [out_total, in] in the plain layout (a view here; a copy for packed layouts)."""
        return self.weight

    def nbytes(self) -> int:
        """Bytes the weight and bias occupy in this layout."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


class Backend:
    """Torch everywhere; platform backends override what they run faster."""

    name = "torch"

    def __init__(self, device: torch.device | str, dtype: torch.dtype, pool_dtype: torch.dtype | None = None,
                 lora_op: str | None = None):
        self.device = devices.normalize(device)
        self.dtype = dtype
        self.pool_dtype = pool_dtype or dtype
        """The LoRA pools' dtype: the model's unless the backend stores adapters in another (bfloat16 on CPU)."""
        self.lora_op = lora_op or self.default_lora_op()
        self.plans = torch_ops.PlanCache()
        """The torch LoRA path's segment batching, reused while a step layout repeats."""

    def default_lora_op(self) -> str:
        return "torch"

    # ------------------------------------------------------------------ base projections
    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Projection:
        """The group weight [out_total, in] as this backend computes with it (called once, at wrap time)."""
        return Projection(weight, bias)

    # ------------------------------------------------------------------ LoRA
    def prepare_pool(self, pool: LoRAPoolTensors) -> object | None:
        """What `lora_apply` needs of a pool beyond its tensors, built once (pools are written in place only)."""
        return None

    def begin_step(self, meta: LoRAMeta) -> object:
        """This step's layout as `lora_apply` takes it (once per step, before the forward)."""
        return meta

    def lora_apply(self, x: torch.Tensor, y: torch.Tensor, pool: LoRAPoolTensors, prepared: object | None,
                   step: object, v: torch.Tensor | None = None) -> torch.Tensor:
        """y += every token's LoRA (`ops.lora_apply`'s semantics); x [T, in], y [T, out_total]; `prepared`
        from `prepare_pool`, `step` from `begin_step`; v: scratch (default the meta's workspace). Returns y."""
        return run_lora_op(self.lora_op, x, y, pool, step, v, self.plans)

    def warm_up(self, pools: Sequence[LoRAPoolTensors]) -> int:
        """Compile, at start-up, whatever the LoRA op compiles on first use; returns the launches made.
        Nothing to compile here."""
        return 0

    # ------------------------------------------------------------------ decoder layers' element-wise steps
    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, norm(h + delta)) for h, delta [T, hidden]; delta None: nothing to add.
        A backend may update h in place."""
        if delta is not None:
            h = h + delta
        return h, norm(h)

    def rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D] and k [T, KVH, D] rotated (x·cos + rotate_half(x)·sin; cos, sin [T, D]), then k and
        v written to cache rows `slots` [T] of the [slots, KVH, D] caches. Returns the rotated q and k."""
        cos, sin = cos[:, None], sin[:, None]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
        return q, k


def run_lora_op(lora_op: str, x: torch.Tensor, y: torch.Tensor, pool: LoRAPoolTensors, meta: LoRAMeta,
                v: torch.Tensor | None, plans: torch_ops.PlanCache | None) -> torch.Tensor:
    """Shrink then expand through the Triton kernels or the torch path."""
    if v is None:
        v = meta.workspace(pool.a.shape[0], pool.a.shape[2])
    if lora_op == "triton":
        from .triton.expand import triton_expand
        from .triton.shrink import triton_shrink

        triton_shrink(x, pool.a, pool.ranks, meta, out=v)
        return triton_expand(v, pool.b_t, pool.ranks, pool.scale, meta, y, pool.slice_offsets, pool.slice_widths)
    if lora_op == "native":
        raise ValueError(f"{BACKEND_ENV}=native runs float32 CPU tensors only, got {x.dtype} on {x.device}")
    torch_ops.torch_shrink(x, pool.a, pool.ranks, meta, out=v, plans=plans)
    return torch_ops.torch_expand(v, pool.b_t, pool.ranks, pool.scale, meta, y, pool.slice_offsets,
                                  pool.slice_widths, plans=plans)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position: x·cos + rotate_half(x)·sin (cos, sin [T, 1, D])."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class TritonBackend(Backend):
    """CUDA: the LoRA op through the Triton segmented-gather kernels, which never sync with the host."""

    name = "triton"

    def default_lora_op(self) -> str:
        return "triton"

    def warm_up(self, pools: Sequence[LoRAPoolTensors]) -> int:
        """Launch shrink and expand once per distinct pool shape and shape class (decode, prefill) on an
        empty layout (every token without an adapter: the programs exit at once), so that every variant
        serving reaches is compiled now. A variant is fixed by the shape class's tile sizes, the pool's
        shapes and dtypes and the group's slices; nothing else of a step selects one."""
        if self.lora_op != "triton":
            return 0
        launches = 0
        seen = set()
        for pool in pools:
            key = (tuple(pool.a.shape), tuple(pool.b_t.shape), pool.a.dtype, tuple(pool.slice_widths))
            if key in seen:
                continue
            seen.add(key)
            for tokens in (1, configs.DECODE_MAX_TOKENS + 1):
                meta = LoRAMeta.allocate(tokens, pool.a.shape[1], self.device, max_slices=pool.a.shape[0],
                                         max_rank=pool.a.shape[2]).update([-1] * tokens)
                x = torch.zeros(tokens, pool.a.shape[3], dtype=pool.a.dtype, device=self.device)
                y = torch.zeros(tokens, pool.out_total, dtype=self.dtype, device=self.device)
                self.lora_apply(x, y, pool, None, self.begin_step(meta))
                launches += 2
        return launches


def select(device: torch.device | str, dtype: torch.dtype, pool_dtype: torch.dtype | None = None) -> Backend:
    """The backend for a model of `dtype` on `device` whose LoRA pools are `pool_dtype` (default dtype).

    CUDA: Triton; CPU float32: the C kernels where they build, else torch with oneDNN's packed weights;
    anything else: torch. $LORAPLEX_LORA_BACKEND forces the LoRA op of the chosen backend.
    """
    from .cpu.backend import select_cpu  # here: kernels/cpu/backend.py builds on this module

    device = devices.normalize(device)
    forced = forced_lora_op() or None
    if forced == "native" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"{BACKEND_ENV}=native runs float32 CPU tensors only, got {dtype} on {device}")
    if device.type == "cuda":
        return TritonBackend(device, dtype, pool_dtype, forced)
    if device.type == "cpu":
        backend = select_cpu(dtype, pool_dtype, forced)
        if backend is not None:
            return backend
    if pool_dtype not in (None, dtype):
        raise ValueError(f"LoRA pools in {pool_dtype} need the CPU C kernels and a float32 CPU model, "
                         f"got {dtype} on {device}")
    return Backend(device, dtype, pool_dtype, forced)
