"""The CPU kernels in C (`cpu_lora.c`): built on first use, called through ctypes.

- `lora_apply` (CPU, float32 activations; float32 or bfloat16 weight pools) runs shrink and expand of
  a projection group in one call, per segment, without torch's per-matmul costs;
- `decode_attention` attends one query per sequence straight from the paged KV cache
  (server/model/attention.py);
- `add_rms_norm` and `rope_store` are element-wise steps of a Llama-shaped decoder
  layer (the CPU backend's, for server/model/decoder.py), one call each instead of several torch operations.

See the C file for the loops and docs/benchmarks.md for the measurements.

Build: the C compiler (``$CC``, else ``cc``) compiles the source with ``-O3 -march=native -fopenmp``
(and ``-ffp-contract=fast``) into ``cache_dir()/native`` (``$LORAPLEX_CACHE_DIR``, else
``$XDG_CACHE_HOME/loraplex``, else ``~/.cache/loraplex``), under a name hashed from the source, the flags and this CPU's model and feature flags, so a cache shared by different CPUs
never loads a binary built for another one. Written to a temporary name and renamed: processes
building at once each get a whole file. No compiler, or a failed build: logged once, and callers
use the torch path (``available()`` is False). OpenMP: the library links ``libgomp.so.1``, which
resolves to the copy torch already loaded, so both share one runtime; the call uses
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch

from ..checks import check_dim, check_pools, check_tensor, resolve_slices
from ..meta import LoRAMeta

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_lora.c")
HEADER = Path(__file__).with_name("cpu_lora_impl.h")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
MAX_SLICES = 16  # as cpu_lora.c
# -ffp-contract=fast: a * b + c as one FMA (ISO C mode, -std=c11, turns that off by default; the
# GEMM runs at about half speed without it).
# -fno-trapping-math -fno-math-errno: no FP exceptions or errno to keep, so loops with conversions and
# square roots vectorize (the results of finite arithmetic do not change).
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast",
          "-fno-trapping-math", "-fno-math-errno") + (
    # full-width AVX-512 where there is any (gcc otherwise prefers 256-bit vectors on Intel)
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
CACHE_ENV = "LORAPLEX_CACHE_DIR"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_fn = None  # {weight dtype: the C function}

# Pointers travel as c_void_p (tensors' data_ptr()): the wrappers below check each tensor's dtype, shape
# and strides before the call, which is what a typed pointer could not check anyway.
_PTR = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float

# The C prototypes in cpu_lora.c, parameter by parameter (every function returns int: 0, or < 0 on failure).
_LORA_APPLY = [
    ("x", _PTR), ("x_stride", _I64), ("y", _PTR), ("y_stride", _I64), ("A", _PTR), ("B_t", _PTR),
    ("num_slices", _I64), ("S", _I64), ("R", _I64), ("in", _I64), ("out_total", _I64),
    ("ranks", _PTR), ("scalings", _PTR), ("offsets", _PTR), ("widths", _PTR),
    ("seg_slot", _PTR), ("seg_start", _PTR), ("seg_len", _PTR), ("num_segments", _I64), ("order", _PTR),
    ("num_threads", _INT)]
SIGNATURES = {
    "loraplex_lora_apply_f32": _LORA_APPLY,
    "loraplex_lora_apply_bf16": _LORA_APPLY,
    "loraplex_decode_attention_f32": [
        ("q", _PTR), ("q_rows", _PTR), ("q_row_stride", _I64), ("q_head_stride", _I64),
        ("k_cache", _PTR), ("v_cache", _PTR), ("blocks", _PTR), ("blocks_per_seq", _I64), ("block_size", _I64),
        ("lengths", _PTR), ("B", _I64), ("H", _I64), ("KVH", _I64), ("D", _I64), ("window", _I64),
        ("scale", _F32), ("out", _PTR), ("out_row_stride", _I64), ("out_head_stride", _I64),
        ("num_threads", _INT)],
    "loraplex_add_rms_norm_f32": [
        ("h", _PTR), ("ldh", _I64), ("d", _PTR), ("ldd", _I64), ("w", _PTR), ("eps", _F32), ("out", _PTR),
        ("ldo", _I64), ("rows", _I64), ("cols", _I64), ("num_threads", _INT)],
    "loraplex_rope_store_f32": [
        ("q", _PTR), ("q_row", _I64), ("q_head", _I64), ("H", _I64), ("k", _PTR), ("k_row", _I64),
        ("k_head", _I64), ("v", _PTR), ("v_row", _I64), ("v_head", _I64), ("KVH", _I64), ("D", _I64),
        ("cos", _PTR), ("sin", _PTR), ("cs_stride", _I64), ("k_cache", _PTR), ("v_cache", _PTR),
        ("slots", _PTR), ("T", _I64), ("num_threads", _INT)],
}


def _cpu_signature() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    """$LORAPLEX_CACHE_DIR, else $XDG_CACHE_HOME/loraplex, else ~/.cache/loraplex."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraplex"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes() + HEADER.read_bytes()
    digest = hashlib.sha256(source + repr((compiler, CFLAGS)).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"cpu_lora-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
            os.replace(built, target)
    library = ctypes.CDLL(str(target))
    for name, params in SIGNATURES.items():
        fn = getattr(library, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctype for _, ctype in params]
    return library


def load() -> ctypes.CDLL | None:
    """The built library, building it on the first call; None when it cannot be built."""
    global _library, _error, _fn
    if _library is not None or _error is not None:
        return _library
    with _lock:
        if _library is None and _error is None:
            try:
                _library = _build()
                _fn = {torch.float32: _library.loraplex_lora_apply_f32,
                       torch.bfloat16: _library.loraplex_lora_apply_bf16}
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _error = str(exc)
                log.warning("CPU C kernels unavailable, using torch's (LoRA, attention) and oneDNN's (GEMM): %s",
                            _error)
    return _library


def available() -> bool:
    return load() is not None


def _require() -> None:
    """Load the library, or raise why it cannot be built (callers check `available()` first)."""
    if _fn is None and load() is None:
        raise RuntimeError(f"the CPU C kernels are unavailable: {_error}")


def takes_float32(*tensors: torch.Tensor) -> bool:
    """Whether the float32 kernels (`decode_attention`) serve these tensors: float32 on CPU,
    and the library builds."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def unavailable_reason() -> str | None:
    load()
    return _error


def _float32_cpu(where: str, **tensors: torch.Tensor) -> None:
    """Raise unless every tensor is float32, on the CPU, with unit stride along its last dimension."""
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"{where} takes float32 CPU tensors with unit stride along the last dimension ({name})")


# ------------------------------------------------------------------ decode attention
def decode_attention(q: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     blocks: torch.Tensor, blocks_per_seq: int, block_size: int, lengths: torch.Tensor,
                     window: int | None, scale: float, out: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its paged context, straight from the cache (float32, CPU).

    q, out: [T, H, D] (any row/head strides, unit stride along D); sequence b's query and output are
    row ``rows[b]``. k_cache, v_cache: [slots, KVH, D] contiguous. blocks: [B · blocks_per_seq] long,
    each sequence's first blocks; lengths: [B] long, its context length (query at length - 1);
    window: attend to the last `window` positions only (None: all). Returns out.
    """
    _require()
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    _float32_cpu("decode_attention", q=q, out=out, k_cache=k_cache, v_cache=v_cache)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must be contiguous [slots, kv_heads, head_dim] of one shape")
    if k_cache.shape[2] != dim or heads % kv_heads or out.shape[1:] != q.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)}, out {tuple(out.shape)} and cache {tuple(k_cache.shape)} do not fit")
    for name, t in (("rows", rows), ("blocks", blocks), ("lengths", lengths)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 tensor")
    count = lengths.shape[0]
    if rows.shape[0] != count or blocks.shape[0] != count * blocks_per_seq:
        raise ValueError(f"{count} lengths, {rows.shape[0]} rows and {blocks.shape[0]} blocks do not fit")
    status = _library.loraplex_decode_attention_f32(
        q.data_ptr(), rows.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        blocks.data_ptr(), blocks_per_seq, block_size, lengths.data_ptr(), count, heads, kv_heads, dim,
        window or 0, scale, out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
    if status != 0:
        raise MemoryError("decode attention could not allocate its scratch memory")
    return out


class PreparedPool:
    """A pool's kernel arguments, checked once (`prepare_pool`): the weight pools of a serving group are
    allocated once and only written in place, so their pointers and shapes hold for every step."""

    __slots__ = ("fn", "args", "in_features", "out_total", "_keep")

    def __init__(self, fn, args: tuple, in_features: int, out_total: int, keep: tuple):
        self.fn, self.args, self.in_features, self.out_total, self._keep = fn, args, in_features, out_total, keep


def prepare_pool(A: torch.Tensor, B_t: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor, out_total: int,
                 slice_offsets: Sequence[int] | None = None,
                 slice_widths: Sequence[int] | None = None) -> PreparedPool:
    """Check a pool for `lora_apply` once (layouts as `lora_apply`); raises what is wrong with it."""
    _require()
    check_tensor("A", A, 4, WEIGHT_DTYPES)
    check_tensor("B_t", B_t, 3, (A.dtype,))
    num_slices, S, R, in_features = A.shape
    check_dim("B_t", B_t, 1, R, "A's max_rank")
    check_dim("B_t", B_t, 2, out_total, "y's out_total")
    if B_t.shape[0] < S:
        raise ValueError(f"B_t has {B_t.shape[0]} slots but A has {S}")
    check_pools(ranks, scalings, num_slices, S)
    for name, t in (("A", A), ("B_t", B_t), ("ranks", ranks), ("scalings", scalings)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the CPU kernel")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU for the CPU kernel")
    if ranks.dtype != torch.int32 or scalings.dtype != torch.float32:
        raise TypeError("ranks must be int32 and scalings float32")
    if num_slices > MAX_SLICES:
        raise ValueError(f"the CPU LoRA kernel takes at most {MAX_SLICES} slices, got {num_slices}")
    offsets, widths = resolve_slices(num_slices, out_total, slice_offsets, slice_widths)
    offs = torch.tensor(list(offsets), dtype=torch.int64)
    wids = torch.tensor(list(widths), dtype=torch.int64)
    args = (A.data_ptr(), B_t.data_ptr(), num_slices, S, R, in_features, out_total,
            ranks.data_ptr(), scalings.data_ptr(), offs.data_ptr(), wids.data_ptr())
    # the entry keeps the tensors alive: their pointers stay valid while it exists
    return PreparedPool(_fn[A.dtype], args, in_features, out_total, (A, B_t, ranks, scalings, offs, wids))


# Pools checked once by calls with loose tensors (`lora_apply`, `ops.lora_apply`): (ids, pointers, slices) -> PreparedPool.
_checked: dict[tuple, PreparedPool] = {}


def _cached_pool(A, B_t, ranks, scalings, out_total, slice_offsets, slice_widths) -> PreparedPool:
    key = (id(A), id(B_t), id(ranks), id(scalings), A.data_ptr(), B_t.data_ptr(), ranks.data_ptr(),
           scalings.data_ptr(), out_total, None if slice_offsets is None else tuple(slice_offsets),
           None if slice_widths is None else tuple(slice_widths))
    pool = _checked.get(key)
    if pool is None:
        pool = prepare_pool(A, B_t, ranks, scalings, out_total, slice_offsets, slice_widths)
        if len(_checked) > 4096:
            _checked.clear()
        _checked[key] = pool
    return pool


def meta_args(meta: LoRAMeta) -> tuple:
    """The step layout's kernel arguments (segments, token order), to build once per step; raises when
    meta has no host segment list (built for a non-CPU device)."""
    segments = meta.segments
    if segments is None:
        raise ValueError("meta has no host segment list (built for a non-CPU device)")
    return (meta.num_tokens, meta.max_slots, meta.seg_slot.data_ptr(), meta.seg_start.data_ptr(),
            meta.seg_len.data_ptr(), len(segments), 0 if meta.contiguous else meta.token_order.data_ptr())


def apply_prepared(x: torch.Tensor, y: torch.Tensor, pool: PreparedPool, step: tuple) -> torch.Tensor:
    """`lora_apply` for a pool from `prepare_pool` and a layout from `meta_args`: only x and y are
    checked here. Returns y."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError("the CPU LoRA kernel takes 2-D x and y")
    _float32_cpu("the CPU LoRA kernel", x=x, y=y)
    num_tokens, max_slots, seg_slot, seg_start, seg_len, num_segments, order = step
    T = x.shape[0]
    if y.shape[0] != T or T != num_tokens:
        raise ValueError(f"x has {T} tokens, y {y.shape[0]}, meta was built for {num_tokens}")
    if x.shape[1] != pool.in_features or y.shape[1] != pool.out_total:
        raise ValueError(f"x [{T}, {x.shape[1]}] and y [{T}, {y.shape[1]}] do not fit the pool "
                         f"({pool.in_features} -> {pool.out_total})")
    if pool.args[3] < max_slots:
        raise ValueError(f"A has {pool.args[3]} slots but meta addresses up to max_slots={max_slots}")
    if T == 0 or num_segments == 0:
        return y
    status = pool.fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), *pool.args, seg_slot, seg_start,
                     seg_len, num_segments, order, torch.get_num_threads())
    if status != 0:
        raise MemoryError("the CPU LoRA kernel could not allocate its scratch memory")
    return y


def lora_apply(
    x: torch.Tensor,         # [T, in_features] fp32
    y: torch.Tensor,         # [T, out_total] fp32, updated in place
    A: torch.Tensor,         # [num_slices, S, max_rank, in_features] fp32 or bf16, contiguous
    B_t: torch.Tensor,       # [S, max_rank, out_total] A's dtype, contiguous
    ranks: torch.Tensor,     # [num_slices, S] int32
    scalings: torch.Tensor,  # [num_slices, S] fp32
    meta: LoRAMeta,
    slice_offsets: Sequence[int] | None = None,
    slice_widths: Sequence[int] | None = None,
) -> torch.Tensor:
    """y += LoRA(x) for every token's adapter (ops.lora_apply's semantics), in C. Returns y."""
    _require()
    check_tensor("x", x, 2, (torch.float32,))
    check_tensor("y", y, 2, (torch.float32,))
    check_dim("A", A, 3, x.shape[1], "x's in_features")
    pool = _cached_pool(A, B_t, ranks, scalings, y.shape[1], slice_offsets, slice_widths)
    return apply_prepared(x, y, pool, meta_args(meta))


# ------------------------------------------------------------------ decoder layers' element-wise steps
def _rows(where: str, name: str, t: torch.Tensor, cols: int) -> None:
    _float32_cpu(where, **{name: t})
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must be a [rows, {cols}] tensor")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor) -> torch.Tensor:
    """h += delta (in place; skipped when None), then out = weight * h / sqrt(mean(h²) + eps) per row,
    the transformers RMSNorm of Llama-shaped models. All [rows, hidden] float32 CPU. Returns out."""
    _require()
    rows, cols = h.shape
    _rows("add_rms_norm", "h", h, cols)
    _rows("add_rms_norm", "out", out, cols)
    if delta is not None:
        _rows("add_rms_norm", "delta", delta, cols)
    if delta is not None and delta.shape[0] != rows or out.shape[0] != rows:
        raise ValueError(f"h has {rows} rows, delta {None if delta is None else delta.shape[0]}, out {out.shape[0]}")
    if weight.dtype != torch.float32 or weight.shape != (cols,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 vector of {cols} values")
    _library.loraplex_add_rms_norm_f32(h.data_ptr(), h.stride(0), None if delta is None else delta.data_ptr(),
                                       0 if delta is None else delta.stride(0), weight.data_ptr(), eps,
                                       out.data_ptr(), out.stride(0), rows, cols, torch.get_num_threads())
    return out


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Rotary embedding of q [T, H, D] and k [T, KVH, D] in place (x·cos + rotate_half(x)·sin, cos and
    sin [T, D]), then k and v [T, KVH, D] into cache rows `slots` [T] (int64; -1: not stored) of the
    [slots, KVH, D] caches. float32 CPU; any row and head strides, unit stride along D."""
    _require()
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError("rope_store takes [T, heads, D] q, k and v")
    T, heads, dim = q.shape
    kv_heads = k.shape[1]
    _float32_cpu("rope_store", q=q, k=k, v=v, cos=cos, sin=sin)
    if k.shape != (T, kv_heads, dim) or v.shape != k.shape or dim % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, dim):
            raise ValueError(f"{name} must be [{T}, {dim}]")
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin need the same row stride")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape[1:] != (kv_heads, dim):
            raise ValueError(f"{name} must be a contiguous float32 [slots, {kv_heads}, {dim}] tensor")
    if slots.dtype != torch.int64 or slots.shape != (T,) or not slots.is_contiguous():
        raise ValueError(f"slots must be a contiguous int64 tensor of {T} values")
    _library.loraplex_rope_store_f32(q.data_ptr(), q.stride(0), q.stride(1), heads, k.data_ptr(), k.stride(0),
                                     k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), kv_heads, dim,
                                     cos.data_ptr(), sin.data_ptr(), cos.stride(0), k_cache.data_ptr(),
                                     v_cache.data_ptr(), slots.data_ptr(), T, torch.get_num_threads())
