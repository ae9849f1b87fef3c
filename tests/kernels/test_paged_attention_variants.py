"""Which variants of the paged attention kernel serving compiles: few decode split counts, and all of
them, with every other meta-parameter a step can select, compiled by the start-up warm-up.

A launch is recorded, not run, as the key Triton compiles a variant under on an H100 (`compile_keys`).
Serving's launches come from `PagedBatch.build` over a buffer that, like the step buffer, aligns its
arrays to 8 bytes only.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.triton import paged_attention as pa
from loraplex.server.model import attention

from .compile_keys import Recorder

H100_SMS = 132
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 8, 2, 16, 16, torch.float16
WINDOWS = {None, 8}  # a model with full-attention and sliding-window layers
MAX_NUM_SEQS = 256


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(pa, "_num_sms", lambda *args: H100_SMS)


@pytest.fixture
def recorder(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(pa, "for_current_mode", recorder)
    return recorder


def test_decode_split_counts_are_powers_of_two(h100):
    cuda = torch.device("cuda", 0)
    for kv_heads in (1, 2, 8):
        counts = {pa.decode_splits(n * kv_heads, cuda) for n in range(1, 257)}
        assert counts <= {1, 2, 4, 8, 16}, f"kv_heads={kv_heads}: split counts {sorted(counts)}"
        assert 16 in counts  # one sequence on an H100


def step_buffer_put(offset: int):
    """`StepBuffers.put` as it lays arrays out: each at the next multiple of 8 bytes, the first at
    `offset` bytes into a 16-byte-aligned buffer."""
    buffer = torch.zeros(1 << 16, dtype=torch.int32)
    used = offset

    def put(values, dtype):
        nonlocal used
        start = -(-used // 8) * 8
        data = torch.as_tensor(values, dtype=dtype)
        view = buffer[start // 4 : start // 4 + data.numel()]
        view.copy_(data)
        used = start + 4 * data.numel()
        return view

    return put


def serve(query_lens: list[int], kv_lens: list[int], skip: bool, window, offset: int) -> None:
    """One step's attention launch as the runner makes it (queries a view of a fused q/k/v output)."""
    tables = [list(range(-(-n // BLOCK_SIZE))) for n in kv_lens]
    skips = [(1, 3) if skip else None for _ in kv_lens]
    batch = attention.PagedBatch.build(query_lens, kv_lens, tables, skips, step_buffer_put(offset))
    tokens = sum(query_lens)
    qkv = torch.empty(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=DTYPE)
    cache = torch.empty(BLOCK_SIZE * max(len(t) for t in tables), KV_HEADS, HEAD_DIM, dtype=DTYPE)
    pa.paged_attention(qkv[:, :HEADS], cache, cache, torch.empty(tokens, HEADS, HEAD_DIM, dtype=DTYPE),
                       batch.block_tables, batch.query_start, batch.kv_lens, batch.max_query_len, BLOCK_SIZE,
                       0.25, window, batch.skip)


def test_warm_up_compiles_every_variant_serving_launches(h100, recorder):
    steps = attention.warm_up_steps(KV_HEADS, WINDOWS, MAX_NUM_SEQS, torch.device("cpu"))
    attention.launch_warm_up_steps(steps, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE, torch.device("cpu"))
    warmed = set(recorder.keys)
    # 5 split counts + prefill, with and without skip and window; the merge kernel for 4 counts
    assert len(steps) == 24 and len(warmed) == 24 + 4

    recorder.keys.clear()
    for skip in (False, True):
        for window in WINDOWS:
            for num_seqs in range(1, MAX_NUM_SEQS + 1):  # decode; contexts of 1 to 17 blocks
                kv_lens = [1 + BLOCK_SIZE * (i % 17) for i in range(num_seqs)]
                serve([1] * num_seqs, kv_lens, skip, window, offset=4 * (num_seqs % 3))
            for query_lens, kv_lens in (([2], [2]), ([1, 5], [20, 5]), ([300, 1, 1], [700, 3, 260]),
                                        ([64] * 3, [64, 128, 4000])):  # prefill chunks, mixed steps
                for offset in (0, 4, 8):
                    serve(query_lens, kv_lens, skip, window, offset)
    missing = recorder.keys - warmed
    assert not missing, f"{len(missing)} variants serving launches are not warmed up, e.g. {next(iter(missing))}"


def test_warm_up_steps_run(h100):
    """The warm-up's dummy steps are valid inputs: interpreted, a few of them run."""
    steps = attention.warm_up_steps(KV_HEADS, {None, 4}, 2, torch.device("cpu"))
    assert {(s.num_seqs, s.max_query_len) for s in steps} == {(1, 1), (1, 2)}  # 16 splits for 1 or 2 seqs
    chosen = [s for s in steps if s.has_skip != (s.window is None)]
    attention.launch_warm_up_steps(chosen, HEADS, KV_HEADS, HEAD_DIM, 2, torch.float32, torch.device("cpu"))


def test_warm_up_is_a_no_op_off_cuda():
    assert attention.warm_up("triton", torch.nn.Linear(2, 2), num_heads=HEADS, kv_heads=KV_HEADS,
                             head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=torch.float32,
                             device=torch.device("cpu"), max_num_seqs=8) == (0, 0.0)


def test_model_windows_reads_each_attention_layer():
    class Attention(torch.nn.Module):
        def __init__(self, index, window):
            super().__init__()
            self.layer_idx, self.sliding_window, self.o_proj = index, window, torch.nn.Identity()

    model = torch.nn.ModuleList([Attention(0, None), Attention(1, 512), Attention(2, 512)])
    assert attention.model_windows(model) == {None, 512}
    assert attention.model_windows(torch.nn.Linear(2, 2)) == {None}
