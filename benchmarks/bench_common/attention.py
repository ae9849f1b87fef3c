"""Workloads for the paged attention kernel, shared by gpu_check.py and tune_attention_kernel.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.testing import paged_attention_reference
from loraplex.kernels.triton.paged_attention import paged_attention
from loraplex.server.model.attention import PagedBatch
from loraplex.server.model.step_buffers import StepBuffers


@dataclass
class Workload:
    q: torch.Tensor        # [T, H, D]
    k_cache: torch.Tensor  # [slots, KVH, D]
    v_cache: torch.Tensor
    out: torch.Tensor
    batch: PagedBatch
    tables: list[list[int]]
    query_lens: list[int]
    kv_lens: list[int]
    block_size: int
    window: int | None
    skips: list[tuple[int, int] | None]

    @property
    def kv_bytes(self) -> int:
        """K and V bytes the kernel must read once: every sequence's visible context."""
        per_token = 2 * self.k_cache.shape[1] * self.k_cache.shape[2] * self.k_cache.element_size()
        visible = [kv if self.window is None else min(kv, self.window + n - 1)
                   for n, kv in zip(self.query_lens, self.kv_lens)]
        return per_token * sum(visible)

    def run(self, config: dict | None = None) -> torch.Tensor:
        return paged_attention(self.q, self.k_cache, self.v_cache, self.out, self.batch.block_tables,
                               self.batch.query_start, self.batch.kv_lens, self.batch.max_query_len,
                               self.block_size, self.q.shape[2] ** -0.5, self.window, self.batch.skip, config)

    def reference(self) -> torch.Tensor:
        return paged_attention_reference(self.q, self.k_cache, self.v_cache, self.tables, self.query_lens,
                                         self.kv_lens, self.block_size, self.q.shape[2] ** -0.5, self.window,
                                         self.skips)


def workload(device: torch.device, dtype: torch.dtype, query_lens: list[int], kv_lens: list[int], heads: int,
             kv_heads: int, head_dim: int, block_size: int = 16, window: int | None = None,
             skips: list[tuple[int, int] | None] | None = None, seed: int = 0) -> Workload:
    """Random queries and cache; each sequence's blocks drawn in random order from the whole cache."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-kv // block_size) for kv in kv_lens]
    num_blocks = sum(need) + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for count in need:
        tables.append(order[used : used + count])
        used += count
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(device, dtype)
    skips = skips or [None] * len(kv_lens)
    buffers = StepBuffers(torch.device(device))
    buffers.begin(8 * (3 * len(kv_lens) + sum(len(t) for t in tables) * len(kv_lens) + 64))
    batch = PagedBatch.build(query_lens, kv_lens, tables, skips, buffers.put)
    buffers.send()
    return Workload(q, k_cache, v_cache, torch.empty_like(q), batch, tables, query_lens, kv_lens, block_size,
                    window, skips)
