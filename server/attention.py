"""Paged KV cache and the attention function the model's layers call through transformers.

The step's tokens are one flat row, `(1, num_tokens)`, holding several sequences (prefill chunks and
decode tokens side by side). `paged_attention` is registered with transformers' `AttentionInterface`
under `ATTENTION_NAME`; the model runner passes the step's `AttentionMeta` as the forward kwarg
`loraplex_attention`, which transformers hands to every attention call. For each layer it writes the
new keys/values into their cache slots, then attends each sequence's queries over that sequence's
context (gathered from its blocks) with a causal mask aligned to the sequence's positions.

Cache layout per layer: `k[layer]`, `v[layer]`: `[num_blocks * block_size, kv_heads, head_dim]`; the
slot of position p of a sequence is `block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "loraplex_paged"
META_KWARG = "loraplex_attention"


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class SequenceSpan:
    """One sequence's part of the step."""

    query_start: int
    """First of its tokens in the flat step."""
    query_len: int
    context_slots: torch.Tensor
    """Cache slots of positions [0, context_len), the step's own tokens included (long)."""


@dataclass
class AttentionMeta:
    cache: PagedKVCache
    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each token of the step (long)."""
    spans: list[SequenceSpan]
    sliding_window: int | None = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Signature of transformers' attention functions; query [1, H, T, D], key/value [1, KVH, T, D].

    Returns (output [1, T, H, D], None).
    """
    meta: AttentionMeta = kwargs[META_KWARG]
    layer = module.layer_idx
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    num_heads, head_dim = query.shape[1], query.shape[3]
    output = torch.empty(query.shape[2], num_heads, head_dim, dtype=query.dtype, device=query.device)
    window = getattr(module, "sliding_window", None) or meta.sliding_window
    for span in meta.spans:
        q = query[:, :, span.query_start : span.query_start + span.query_len]  # [1, H, n, D]
        k = k_cache[span.context_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, ctx, D]
        v = v_cache[span.context_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask = _causal_mask(span.query_len, k.shape[2], window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        output[span.query_start : span.query_start + span.query_len] = out[0].transpose(0, 1)
    return output.unsqueeze(0), None


def _causal_mask(query_len: int, context_len: int, window: int | None, device) -> torch.Tensor | None:
    """Query i sits at position context_len - query_len + i and sees keys at positions <= its own."""
    if query_len == 1 and (window is None or context_len <= window):
        return None
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
