"""Paged KV cache and the attention function the model's layers call through transformers.

The step's tokens are one flat row, `(1, num_tokens)`, holding several sequences (prefill chunks and
decode tokens side by side). `paged_attention` is registered with transformers' `AttentionInterface`
under `ATTENTION_NAME`; the model runner passes the step's `AttentionMeta` as the forward kwarg
`loraplex_attention`, which transformers hands to every attention call. For each layer it writes the
new keys/values into their cache slots, then attends each sequence's queries over that sequence's
context (gathered from its blocks) with a causal mask aligned to the sequence's positions.

Decoding sequences (one query each) are attended together: on CPU in float32, straight from the
cache blocks by the C kernel (`kernels/cpu/native.py`, `decode_attention`); elsewhere their contexts are
gathered into `[B, kv_heads, L, head_dim]` batches of whole blocks, padding masked out (no mask
when every context fills its blocks), one attention call per group of sequences of similar length
(`decode_groups`: padding at most doubles what is gathered, and a call gathers a bounded number of
positions), so memory stays proportional to the tokens attended. Fresh prefills of equal length (positions
[0, n), nothing cached before: their context is their own keys and values) share one causal call
without touching the cache. Other chunks (a chunked prefill's later parts, prefix-tuning sequences)
keep one call per sequence over their gathered context.

The backend is chosen once, when the model runner is built (`select_backend`):

    LORAPLEX_ATTENTION_BACKEND=triton|torch|native

- triton (the default on CUDA): every sequence of the step, decode and prefill chunks alike, in one
  launch of the Triton paged attention kernel (`kernels/triton/paged_attention.py`) that reads K/V
  straight from the cache through each sequence's block table (`PagedBatch`);
- native (the default for float32 models on CPU): decoding sequences through the C kernel, the rest
  as torch;
- torch: gathered K/V and SDPA as described above.

Cache layout per layer: `k[layer]`, `v[layer]`: `[num_blocks * block_size, kv_heads, head_dim]`; the
slot of position p of a sequence is `block_table[p // block_size] * block_size + p % block_size`.

`warm_up` launches, at start-up, every variant of the Triton kernel that serving can reach, so that none
compiles while requests wait.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from loraplex.kernels.cpu import native
from loraplex.kernels.triton.paged_attention import decode_splits
from loraplex.kernels.triton.paged_attention import paged_attention as triton_paged_attention
from loraplex.kernels.triton.utils import interpreting
from loraplex.server.errors import UserError

ATTENTION_NAME = "loraplex_paged"
# Keys (and as many values) one gathered decode call may hold, in elements (128 MiB each in bfloat16):
# a long context decodes in a call of its own rather than padding every other sequence to its length.
GATHER_MAX_ELEMENTS = 64 * 2**20
META_KWARG = "loraplex_attention"
BACKEND_ENV = "LORAPLEX_ATTENTION_BACKEND"
BACKENDS = ("triton", "torch", "native")

log = logging.getLogger(__name__)


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``$LORAPLEX_ATTENTION_BACKEND`` if set, else "triton" on CUDA, "native" for float32 on CPU where
    the C kernel builds, else "torch"; raises a UserError for a backend that cannot serve the model."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    probe = torch.empty(0, dtype=dtype, device=device)
    if not forced:
        return "triton" if device.type == "cuda" else "native" if native.takes_float32(probe) else "torch"
    if forced not in BACKENDS:
        raise UserError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "triton" and device.type != "cuda" and not interpreting():
        raise UserError(f"{BACKEND_ENV}=triton needs a CUDA device (or TRITON_INTERPRET=1), the model is on {device}")
    if forced == "native" and not native.takes_float32(probe):
        why = native.unavailable_reason() or f"the model is {str(dtype).replace('torch.', '')} on {device}"
        raise UserError(f"{BACKEND_ENV}=native runs float32 models on CPU with the C kernel: {why}")
    return forced


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
class DecodeBatch:
    """The step's decoding sequences, attended in one call over whole gathered blocks.

    Worked example, block_size 4: two sequences with block tables [7, 2] and [5], at lengths 6 and 3
    (their query is the last position): blocks [7, 2, 5, 0] (padded to 2 per sequence), keys of
    positions [0, 8) per sequence; the first attends to 6 of them, the second to 3.
    """

    rows: torch.Tensor
    """[B] long: the query's row in the flat step."""
    row_range: tuple[int, int] | None
    """(first, last + 1) when the rows are consecutive: sliced rather than gathered."""
    blocks: torch.Tensor
    """[B * blocks_per_seq] long: each sequence's first blocks_per_seq blocks, padded with block 0."""
    blocks_per_seq: int
    lengths: torch.Tensor
    """[B] long: context length of each sequence (its query sits at position length - 1)."""
    uniform: bool
    """Every context fills its blocks exactly: nothing to mask."""
    masks: dict = field(default_factory=dict)
    """Per sliding window (None: none): [B, 1, 1, L] bool, True where a key is attended."""
    groups: list["DecodeBatch"] = field(default_factory=list)
    """The same sequences split for the gathering path (`decode_groups`); empty: this batch itself."""

    @classmethod
    def build(cls, rows: list[int], tables: list[list[int]], lengths: list[int], block_size: int,
              tensor: Callable[[list[int]], torch.Tensor], max_gather_tokens: int) -> "DecodeBatch":
        """The batch of the step's decoding sequences, with its gathering groups; `tensor` puts a
        list of ints on the device as a long tensor (the runner's step buffer)."""
        batch = cls._one(rows, tables, lengths, block_size, tensor)
        groups = decode_groups(lengths, block_size, max_gather_tokens)
        if len(groups) > 1:
            batch.groups = [cls._one(*([values[i] for i in group] for values in (rows, tables, lengths)),
                                     block_size, tensor) for group in groups]
        return batch

    @classmethod
    def _one(cls, rows: list[int], tables: list[list[int]], lengths: list[int], block_size: int,
             tensor: Callable[[list[int]], torch.Tensor]) -> "DecodeBatch":
        per_seq = -(-max(lengths) // block_size)
        blocks = []
        for table in tables:
            blocks.extend(table[:per_seq])
            blocks.extend([0] * (per_seq - len(table[:per_seq])))
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        return cls(
            rows=tensor(rows),
            row_range=(rows[0], rows[-1] + 1) if consecutive else None,
            blocks=tensor(blocks),
            blocks_per_seq=per_seq,
            lengths=tensor(lengths),
            uniform=all(length == per_seq * block_size for length in lengths),
        )

    def gather(self, cache: torch.Tensor, block_size: int) -> torch.Tensor:
        """[B, kv_heads, L, head_dim] keys (or values) of positions [0, L), L = blocks_per_seq · block_size."""
        blocks = cache.view(-1, block_size, *cache.shape[1:]).index_select(0, self.blocks)
        return blocks.view(self.lengths.shape[0], self.blocks_per_seq * block_size, *cache.shape[1:]).transpose(1, 2)

    def mask(self, window: int | None, length: int) -> torch.Tensor | None:
        if window is not None and window >= length:
            window = None
        if window is None and self.uniform:
            return None
        if window not in self.masks:
            k_pos = torch.arange(length, device=self.lengths.device)[None, :]
            lengths = self.lengths[:, None]
            mask = k_pos < lengths
            if window is not None:
                mask &= k_pos >= lengths - window
            self.masks[window] = mask[:, None, None, :]
        return self.masks[window]


def decode_groups(lengths: list[int], block_size: int, max_tokens: int) -> list[list[int]]:
    """Decoding sequences (indices into `lengths`) grouped for gathered attention, shortest first.

    Every sequence of a group needs at least half the blocks of the group's longest, so padding to
    the longest at most doubles what is gathered; and a group gathers at most `max_tokens` positions
    (a longer sequence goes alone). Worked example, block_size 4: lengths [30, 3, 5, 6] need blocks
    [8, 1, 2, 2]; with max_tokens 16 the groups are [[1, 2], [3], [0]] (adding sequence 3 to [1, 2]
    would gather 3 x 2 blocks = 24 positions), with max_tokens 1000 they are [[1, 2, 3], [0]].
    """
    need = [-(-length // block_size) for length in lengths]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=need.__getitem__):
        group = groups[-1] if groups else None
        if group is not None and need[i] <= 2 * need[group[0]] and (len(group) + 1) * need[i] * block_size <= max_tokens:
            group.append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class PrefillBatch:
    """k fresh prefill chunks of n tokens each (positions [0, n)), attended in one causal call.

    Worked example: chunks of 4 tokens at rows 0, 4 and 8 give n=4, k=3, row0=0 (rows [0, 12), a
    view); at rows 0, 5 and 9 they give rows = [0..3, 5..8, 9..12] (gathered).
    """

    n: int
    k: int
    row0: int
    """Rows are [row0, row0 + k·n) when `rows` is None."""
    rows: torch.Tensor | None = None
    """[k·n] long: the chunks' rows, chunk by chunk, when they are not consecutive."""


@dataclass
class PagedBatch:
    """Every sequence of the step for the Triton kernel, as int32 views of the step's metadata buffer.

    Worked example, block_size 4: a decode at length 6 (table [7, 2]) at row 0, then a 3-token chunk
    of a sequence with 5 entries cached (table [5, 1]) at rows 1-3: query_start [0, 1, 4], kv_lens
    [6, 8], block_tables [[7, 2], [5, 1]], max_query_len 3.
    """

    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int32, each table padded with block 0."""
    query_start: torch.Tensor
    """[num_seqs + 1] int32: sequence s has rows [query_start[s], query_start[s + 1])."""
    kv_lens: torch.Tensor
    """[num_seqs] int32: cache entries of each sequence, this step's included."""
    max_query_len: int
    skip: torch.Tensor | None = None
    """[num_seqs, 2] int32: KV indices hidden from attention (prefix-tuning padding); None: none."""

    @classmethod
    def build(cls, query_lens: list[int], kv_lens: list[int], tables: list[list[int]],
              skips: list[tuple[int, int] | None], put) -> "PagedBatch":
        """Sequences in row order (each one's rows follow the previous one's); `put` places a host
        array in the step's metadata buffer (`StepBuffers.put`) and returns its device view."""
        num_seqs, max_blocks = len(query_lens), max(len(table) for table in tables)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        padded = []
        for table in tables:
            padded.extend(table)
            padded.extend([0] * (max_blocks - len(table)))
        has_skip = any(skip is not None for skip in skips)
        return cls(
            block_tables=put(padded, torch.int32).view(num_seqs, max_blocks),
            query_start=put(starts, torch.int32),
            kv_lens=put(kv_lens, torch.int32),
            max_query_len=max(query_lens),
            skip=put([v for skip in skips for v in (skip or (0, 0))], torch.int32).view(num_seqs, 2)
            if has_skip else None,
        )


@dataclass
class AttentionMeta:
    cache: PagedKVCache
    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each token of the step (long)."""
    spans: list[SequenceSpan]
    """Sequences attended one by one over their gathered context."""
    decode: DecodeBatch | None = None
    """Sequences decoding one token, attended together."""
    prefills: list[PrefillBatch] = field(default_factory=list)
    """Fresh prefill chunks, one batch per length."""
    masks: dict = field(default_factory=dict)
    """(query_len, context_len, window) -> causal mask, built once per step (every layer uses it)."""
    backend: str = "torch"
    """`select_backend`'s choice: "native" sends `decode` to the C kernel."""
    paged: PagedBatch | None = None
    """The whole step for the Triton kernel (backend "triton"; spans, decode and prefills are then empty)."""


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Signature of transformers' attention functions; query [1, H, T, D], key/value [1, KVH, T, D].

    Returns (output [1, T, H, D], None).
    """
    meta: AttentionMeta = kwargs[META_KWARG]
    store_kv(meta, module.layer_idx, key, value)
    # the window as the model hands it to its attention function (Mistral: from its config; Qwen2/3,
    # Gemma: the layer's own, None for full-attention layers), else as `layer_window` finds it
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else layer_window(module)
    return attend(module, query, key, value, meta, scaling, window), None


def layer_window(module) -> int | None:
    """The sliding window a Llama-shaped attention module attends with (None: all positions): its own
    `sliding_window` where it has one (Qwen2/3: None on full-attention layers), else its config's
    (Mistral passes `config.sliding_window` to the attention function)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


def store_kv(meta: AttentionMeta, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write the step's keys/values [1, KVH, T, D] into their cache slots."""
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))


def attend(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMeta,
           scaling: float | None, window: int | None) -> torch.Tensor:
    """Every sequence's queries over its context, the step's keys/values already stored (`store_kv`).

    query [1, H, T, D], key/value [1, KVH, T, D] (the fresh prefills read them directly); window: each
    query sees the last `window` positions only (None: all); returns [1, T, H, D].
    """
    k_cache, v_cache = meta.cache.k[module.layer_idx], meta.cache.v[module.layer_idx]
    num_heads, head_dim = query.shape[1], query.shape[3]
    output = torch.empty(query.shape[2], num_heads, head_dim, dtype=query.dtype, device=query.device)
    scale = head_dim ** -0.5 if scaling is None else scaling
    paged = meta.paged
    if paged is not None:
        triton_paged_attention(query[0].transpose(0, 1), k_cache, v_cache, output, paged.block_tables,
                               paged.query_start, paged.kv_lens, paged.max_query_len, meta.cache.block_size,
                               scale, window, paged.skip)
        return output.unsqueeze(0)
    decode = meta.decode
    if decode is not None and meta.backend == "native":
        native.decode_attention(query[0].transpose(0, 1), decode.rows, k_cache, v_cache, decode.blocks,
                                decode.blocks_per_seq, meta.cache.block_size, decode.lengths, window, scale, output)
    elif decode is not None:
        for part in decode.groups or [decode]:  # one group at a time: its gathered K/V are freed before the next
            if part.row_range is not None:
                q = query[0, :, part.row_range[0] : part.row_range[1]]  # [H, B, D]
            else:
                q = query[0].index_select(1, part.rows)
            q = q.transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            block_size = meta.cache.block_size
            k = part.gather(k_cache, block_size).to(q.dtype)  # [B, KVH, L, D]
            v = part.gather(v_cache, block_size).to(q.dtype)
            mask = part.mask(window, k.shape[2])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
            del k, v
            if part.row_range is not None:
                output[part.row_range[0] : part.row_range[1]] = out[:, :, 0]
            else:
                output.index_copy_(0, part.rows, out[:, :, 0])
    for batch in meta.prefills:
        n, k, kn = batch.n, batch.k, batch.k * batch.n
        if batch.rows is None:
            q, keys, values = (t[0, :, batch.row0 : batch.row0 + kn] for t in (query, key, value))  # [heads, k·n, D]
        else:
            q, keys, values = (t[0].index_select(1, batch.rows) for t in (query, key, value))
        # as the cache would hand them back: stored in the cache's dtype
        keys = keys.to(k_cache.dtype).to(q.dtype).view(-1, k, n, head_dim).transpose(0, 1)  # [k, KVH, n, D]
        values = values.to(v_cache.dtype).to(q.dtype).view(-1, k, n, head_dim).transpose(0, 1)
        q = q.view(num_heads, k, n, head_dim).transpose(0, 1)  # [k, H, n, D]
        mask = None if window is None or n <= window else _mask(meta, n, n, window, q.device)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and n > 1,
                                             scale=scaling, enable_gqa=True)
        out = out.transpose(1, 2).reshape(kn, num_heads, head_dim)  # [k·n, H, D]
        if batch.rows is None:
            output[batch.row0 : batch.row0 + kn] = out
        else:
            output.index_copy_(0, batch.rows, out)
    for span in meta.spans:
        q = query[:, :, span.query_start : span.query_start + span.query_len]  # [1, H, n, D]
        k = k_cache.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, ctx, D]
        v = v_cache.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask = _mask(meta, span.query_len, k.shape[2], window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        output[span.query_start : span.query_start + span.query_len] = out[0].transpose(0, 1)
    return output.unsqueeze(0)


def _mask(meta: AttentionMeta, query_len: int, context_len: int, window: int | None, device) -> torch.Tensor | None:
    """`_causal_mask`, built once per step: every layer attends with the same masks."""
    key = (query_len, context_len, window)
    if key not in meta.masks:
        meta.masks[key] = _causal_mask(query_len, context_len, window, device)
    return meta.masks[key]


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


def graph_safe(backend: str) -> bool:
    """Whether decode attention on `backend` may be captured in a CUDA graph: inputs of fixed shape
    (block tables padded to the longest context) at a cost that does not grow with that padding. The
    Triton kernel reads only each sequence's own blocks; the torch path would gather every sequence's
    longest possible context in every layer."""
    return backend == "triton"


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)


@dataclass(frozen=True)
class WarmUpStep:
    """A step shape that selects one variant of the Triton kernel (see `warm_up_steps`)."""

    num_seqs: int
    max_query_len: int
    has_skip: bool
    window: int | None


def model_windows(model) -> set[int | None]:
    """The sliding windows of the model's attention layers as `layer_window` finds them (None: all
    positions); {None} when it finds no attention layer."""
    return {layer_window(m) for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")} or {None}


def warm_up_steps(kv_heads: int, windows: Iterable[int | None], max_num_seqs: int,
                  device: torch.device) -> list[WarmUpStep]:
    """One step per variant of the Triton kernel that a server can launch; the model fixes the rest.

    What selects a variant (`kernels/triton/paged_attention.py`), and what serving reaches:
    - the shape class: "decode" (every sequence one token) or "prefill" (max_query_len > 1; the tile is
      the same for any length): both;
    - NUM_SPLITS, decode only: `decode_splits(num_seqs * kv_heads)` for every eager batch of 1 to
      max_num_seqs sequences (captured decode graphs compile their padded sizes when captured), one
      step per distinct count, at the smallest batch that gives it; prefill: 1;
    - HAS_SKIP: a prefix-tuning adapter may be loaded at any time: both;
    - HAS_WINDOW: per layer, from `windows` (`model_windows`);
    - fixed by the model: GROUP, HEAD_DIM, FP32_DOT (dtype), BLOCK_SIZE, the cache's strides.
    """
    smallest = {decode_splits(n * kv_heads, device): n for n in range(max_num_seqs, 0, -1)}
    shapes = [(n, 1) for n in sorted(smallest.values())] + [(1, 2)]
    by_has_window = {window is not None: window for window in windows}
    return [WarmUpStep(num_seqs, query_len, has_skip, window) for num_seqs, query_len in shapes
            for has_skip in (False, True) for window in by_has_window.values()]


def launch_warm_up_steps(steps: list[WarmUpStep], num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                         dtype: torch.dtype, device: torch.device) -> None:
    """Launch the Triton kernel once per step on dummy inputs of the model's shapes (one cache block,
    every query zero): whatever a variant needs compiled is compiled. Its queries, cache and output are
    fresh, contiguous tensors; serving's are laid out alike up to their strides, which are multiples of
    16 as here when head_dim is (the compiled variant specializes on that)."""
    cache = torch.zeros(block_size, kv_heads, head_dim, dtype=dtype, device=device)
    for step in steps:
        n, t = step.num_seqs, step.max_query_len
        q = torch.zeros(n * t, num_heads, head_dim, dtype=dtype, device=device)
        tables = torch.zeros(n, -(-t // block_size), dtype=torch.int32, device=device)  # every entry: block 0
        query_start = torch.arange(0, n * t + 1, t, dtype=torch.int32, device=device)
        kv_lens = torch.full((n,), t, dtype=torch.int32, device=device)
        skip = torch.zeros(n, 2, dtype=torch.int32, device=device) if step.has_skip else None
        triton_paged_attention(q, cache, cache, torch.empty_like(q), tables, query_start, kv_lens, t, block_size,
                               1.0, step.window, skip)


def warm_up(backend: str, model, *, num_heads: int, kv_heads: int, head_dim: int, block_size: int,
            dtype: torch.dtype, device: torch.device, max_num_seqs: int) -> tuple[int, float]:
    """Compile, at start-up, every variant of the Triton paged attention kernel that serving can reach
    (`warm_up_steps`); returns (variants, seconds). A no-op (0 variants) unless the backend is
    "triton" on CUDA: the interpreter compiles nothing."""
    if backend != "triton" or device.type != "cuda":
        return 0, 0.0
    started = time.perf_counter()
    steps = warm_up_steps(kv_heads, model_windows(model), max_num_seqs, device)
    launch_warm_up_steps(steps, num_heads, kv_heads, head_dim, block_size, dtype, device)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    log.info("compiled %d paged-attention variants in %.1f s", len(steps), seconds)
    return len(steps), seconds
