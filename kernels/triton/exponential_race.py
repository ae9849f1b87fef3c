"""The exponential race of every sampled row in one launch (Triton), with Philox noise.

Semantics (``kernels/exponential_race.py`` states them in full and holds the torch reference):

    u[m, v]  = Philox4x32-10(key = seeds[m], counter = (v // 4, draws[m], 0))[v % 4] -> (0, 1)
    token[m] = argmax_v(scores[m, v] - log(-log(u[m, v])))       ties: the lowest v; NaN never wins

Grid: (M,). A program takes one row, walks its vocabulary in blocks of BLOCK_V keeping each lane's
best key and index, then reduces the lanes. The uniforms equal the reference's bit for bit; the keys
go through the device's float32 log, so a token can differ from the reference's only at a near-tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_tensor
from ..devices import same_device
from .utils import check_launch_device, for_current_mode

BLOCK_V = 1024


@triton.jit
def _exponential_race_kernel(
    # pointers
    scores_ptr,    # [M, V] float32
    seeds_ptr,     # [M] int64 (a uint64 seed's bits)
    draws_ptr,     # [M] int64
    tokens_ptr,    # [M] int64
    uniforms_ptr,  # [M, V] float32, written only if STORE_UNIFORMS (tests)
    # sizes
    V,
    # strides (in elements)
    stride_scores,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    STORE_UNIFORMS: tl.constexpr,
):
    row = tl.program_id(0)
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    draw = tl.load(draws_ptr + row).to(tl.uint64, bitcast=True)
    lanes = tl.arange(0, BLOCK_V)
    zero = tl.full((BLOCK_V,), 0, tl.uint32)
    key0 = zero + (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = zero + (seed >> 32).to(tl.uint32)
    draw_lo = zero + (draw & 0xFFFFFFFF).to(tl.uint32)
    draw_hi = zero + (draw >> 32).to(tl.uint32)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    best_index = lanes  # all keys -inf: token 0, as torch.argmax
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        s = tl.load(scores_ptr + row.to(tl.int64) * stride_scores + offs, mask=mask, other=float("-inf"))
        c0 = (offs >> 2).to(tl.uint32)
        c1 = draw_lo
        c2 = draw_hi
        c3 = zero
        k0 = key0
        k1 = key1
        for _ in tl.static_range(10):  # Philox4x32-10 (Random123's constants)
            _c0 = c0
            _c2 = c2
            c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
            c1 = _c2 * 0xCD9E8D57
            c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        word = offs & 3
        x = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
        u = ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # * 2**-24: exact
        if STORE_UNIFORMS:
            tl.store(uniforms_ptr + row.to(tl.int64) * V + offs, u, mask=mask)
        key = s - tl.log(-tl.log(u))
        better = key > best  # strict: a lane keeps its earliest index on ties; NaN is never better
        best = tl.where(better, key, best)
        best_index = tl.where(better, offs, best_index)
    top = tl.reduce(best, 0, tl.standard._elementwise_max)
    token = tl.reduce(tl.where(best == top, best_index, V + BLOCK_V), 0, tl.standard._elementwise_min)
    tl.store(tokens_ptr + row, token.to(tl.int64))


def triton_exponential_race(
    scores: torch.Tensor,  # [M, V] float32, unit stride in the last dim
    seeds: torch.Tensor,   # [M] int64
    draws: torch.Tensor,   # [M] int64
    uniforms: torch.Tensor | None = None,  # [M, V] float32 contiguous: receives the draws (tests)
) -> torch.Tensor:  # [M] int64
    check_tensor("scores", scores, 2, (torch.float32,), last_dim_contiguous=True)
    check_launch_device("scores", scores)
    M, V = scores.shape
    for name, t in (("seeds", seeds), ("draws", draws)):
        check_tensor(name, t, 1, (torch.int64,), contiguous=True)
        if t.shape[0] != M:
            raise ValueError(f"{name} has {t.shape[0]} rows, scores has {M}")
        if not same_device(t.device, scores.device):
            raise ValueError(f"{name} is on {t.device}, expected {scores.device} (scores' device)")
    if uniforms is not None:
        check_tensor("uniforms", uniforms, 2, (torch.float32,), contiguous=True)
        if tuple(uniforms.shape) != (M, V):
            raise ValueError(f"uniforms has shape {tuple(uniforms.shape)}, expected {(M, V)}")
    if not 0 < V < 2**31:
        raise ValueError(f"a vocabulary of {V} is outside [1, 2**31) (the kernel's int32 token index)")
    tokens = torch.empty(M, dtype=torch.int64, device=scores.device)
    if M == 0:
        return tokens
    for_current_mode(_exponential_race_kernel)[(M,)](
        scores, seeds, draws, tokens, tokens if uniforms is None else uniforms,
        V, scores.stride(0),
        BLOCK_V=BLOCK_V, STORE_UNIFORMS=uniforms is not None, num_warps=4,
    )
    return tokens
