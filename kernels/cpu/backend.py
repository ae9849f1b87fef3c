"""The CPU float32 backends: with the C kernels of `native` where they build, else torch.

Both keep each fused group's weight prepacked for oneDNN's GEMM (only in that layout). `CPUBackend`
runs the LoRA op in C for steps whose segments are all at most ``NATIVE_MAX_SEGMENT`` tokens (decode:
one matrix-vector product per adapter, read at memory bandwidth; prefill chunks) and through torch's
matmul for longer ones (long prefills, where torch's GEMM is the better one), bfloat16 pools always in
C (nothing else takes them with float32 activations), and two of the decoder's element-wise steps
(residual add + RMSNorm, rotary + KV cache write) in C.
docs/benchmarks.md has the measurements behind these choices.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backend import Backend, LoRAPoolTensors, Projection, run_lora_op
from ..meta import LoRAMeta
from . import native

# Longest segment (tokens of one adapter in a step) that the C LoRA kernel takes; longer steps go to
# torch's matmul, the better GEMM from there on.
NATIVE_MAX_SEGMENT = 128
# oneDNN lays a packed weight out for GEMMs of about this many rows (a decode step's batch); any row
# count works.
PACK_ROWS_HINT = 16


class OneDNNProjection(Projection):
    """A group weight prepacked for oneDNN's GEMM (kept in that layout only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT), bias)
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def columns(self, x: torch.Tensor, offset: int, width: int) -> torch.Tensor:
        return self(x)[:, offset : offset + width]

    def dense(self) -> torch.Tensor:
        return self.weight.to_dense()


def _can_pack_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class TorchCPUBackend(Backend):
    """CPU float32 without the C kernels: torch ops, the group weights prepacked for oneDNN."""

    name = "torch-cpu"

    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Projection:
        return OneDNNProjection(weight, bias) if _can_pack_onednn() else Projection(weight, bias)


class CPUStep:
    """One step's layout for `CPUBackend.lora_apply`: the meta (torch path), the C kernel's arguments and
    the longest segment (which of the two runs the step)."""

    __slots__ = ("meta", "native_args", "longest")

    def __init__(self, meta: LoRAMeta):
        self.meta = meta
        self.native_args = native.meta_args(meta)
        self.longest = max((length for _, _, length in meta.segments), default=0)


class CPUBackend(TorchCPUBackend):
    """CPU float32 with the C kernels built: C LoRA, C norm and rotary steps (oneDNN's GEMM, as without them)."""

    name = "cpu"

    def default_lora_op(self) -> str:
        return "native"

    def prepare_pool(self, pool: LoRAPoolTensors) -> native.PreparedPool:
        return native.prepare_pool(pool.a, pool.b_t, pool.ranks, pool.scale, pool.out_total, pool.slice_offsets,
                                   pool.slice_widths)

    def begin_step(self, meta: LoRAMeta) -> CPUStep:
        return CPUStep(meta)

    def lora_apply(self, x: torch.Tensor, y: torch.Tensor, pool: LoRAPoolTensors, prepared: object | None,
                   step: CPUStep, v: torch.Tensor | None = None) -> torch.Tensor:
        # bfloat16 pools with float32 activations: only the C kernel takes them
        in_c = self.lora_op == "native" and (pool.a.dtype != x.dtype or step.longest <= NATIVE_MAX_SEGMENT)
        if in_c and prepared is None:  # loose tensors (ops.lora_apply): checked, and kept, per pool
            return native.lora_apply(x, y, pool.a, pool.b_t, pool.ranks, pool.scale, step.meta, pool.slice_offsets,
                                     pool.slice_widths)
        if in_c:
            return native.apply_prepared(x, y, prepared, step.native_args)
        lora_op = "torch" if self.lora_op == "native" else self.lora_op
        return run_lora_op(lora_op, x, y, pool, step.meta, v, self.plans)

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return h, native.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon, torch.empty_like(h))

    def rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        native.rope_store(q, k, v, cos, sin, k_cache, v_cache, slots)
        return q, k


def select_cpu(dtype: torch.dtype, pool_dtype: torch.dtype | None, lora_op: str | None) -> Backend | None:
    """The CPU backend for a `dtype` model, or None when plain torch serves it."""
    if dtype != torch.float32:
        return None
    if native.available():
        return CPUBackend("cpu", dtype, pool_dtype, lora_op)
    if pool_dtype not in (None, dtype):
        raise ValueError(f"LoRA pools in {pool_dtype} need the CPU C kernels, which could not be built: "
                         f"{native.unavailable_reason()}")
    if lora_op == "native":
        raise ValueError(f"the C kernels could not be built: {native.unavailable_reason()}")
    return TorchCPUBackend("cpu", dtype, pool_dtype, lora_op)


def check_adapter_dtype(adapter_dtype: str, dtype: str, device: str) -> None:
    """Raise ValueError unless `adapter_dtype` can store the adapters of a `dtype` model on `device`:
    "auto" always; "bfloat16" for a float32 model on CPU, with the C kernel built (the only path that
    takes bfloat16 pools with float32 activations). The messages name the `loraplex serve` / `bench` flags:
    both commands check with this function before anything loads, and the model runner when it builds."""
    if adapter_dtype == "auto":
        return
    if device.split(":")[0] != "cpu" or dtype != "float32":
        raise ValueError(f"--adapter-dtype {adapter_dtype} is for a float32 model on CPU, got --dtype {dtype} on "
                         f"{device} (on a GPU, serve the model itself in bfloat16)")
    if not native.available():
        raise ValueError(f"--adapter-dtype {adapter_dtype} needs the CPU LoRA kernel, which could not be built: "
                         f"{native.unavailable_reason()}")
