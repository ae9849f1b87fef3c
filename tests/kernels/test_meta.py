"""LoRAMeta: grouping by slot, segments, tiles, contiguous layouts, buffer reuse, validation."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.kernels.meta import LoRAMeta
from tests.kernels.cases import MIXES, token_slots


def tiles_by_slot(meta: LoRAMeta) -> dict[int, list[int]]:
    """Token indices each slot's tiles cover, in tile order, read back from the tile buffers."""
    order = meta.order.tolist()
    covered: dict[int, list[int]] = {}
    for j in range(meta.num_tiles):
        slot, start, n = (int(meta.tile_slot[j]), int(meta.tile_start[j]), int(meta.tile_len[j]))
        if slot < 0:
            assert n == 0
            continue
        assert 1 <= n <= meta.block_m
        covered.setdefault(slot, []).extend(order[start:start + n])
    return covered


def expected_groups(slots: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    return groups


def test_worked_example_from_docstring():
    meta = LoRAMeta.allocate(16, 4, "cpu", min_block_m=2).update([2, -1, 0, 2, 2, 0], block_m=2)
    assert meta.order.tolist() == [2, 5, 0, 3, 4, 1]
    assert meta.segments == [(0, 0, 2), (2, 2, 3)]
    assert meta.num_tiles == 7
    n = meta.num_tiles
    assert meta.tile_slot[:n].tolist() == [0, 2, 2, -1, -1, -1, -1]
    assert meta.tile_start[:n].tolist()[:3] == [0, 2, 4]
    assert meta.tile_len[:n].tolist()[:3] == [2, 2, 1]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("T", [1, 7, 64, 133])
@pytest.mark.parametrize("block_m", [None, 16, 64])
def test_permuted_grouping(mix, T, block_m):
    gen = torch.Generator().manual_seed(T)
    S = 12
    slots = token_slots(mix, T, S, gen)
    meta = LoRAMeta.allocate(256, S, "cpu").update(slots, block_m=block_m)
    expected = expected_groups(slots.tolist())

    order = meta.order.tolist()
    assert sorted(order) == list(range(T))
    keys = [s if s >= 0 else S for s in slots[order].tolist()]
    assert keys == sorted(keys)                               # grouped, no-adapter tokens last
    # stable: tokens keep their relative order inside a slot
    assert meta.segments == [(s, order.index(ts[0]), len(ts)) for s, ts in sorted(expected.items())]
    assert tiles_by_slot(meta) == expected                    # every token exactly once, in its slot
    assert meta.num_tiles == -(-T // meta.block_m) + min(T, S)
    k = len(expected)
    assert meta.seg_slot[:k].tolist() == sorted(expected)
    assert (meta.seg_slot[k:] == -1).all() and (meta.seg_len[k:] == 0).all()


def test_contiguous_layout_reads_rows_in_place():
    slots = [3, 3, 3, -1, 0, 0, 5, -1, -1, 1]
    meta = LoRAMeta.allocate(32, 8, "cpu", min_block_m=2).update(slots, contiguous=True, block_m=2)
    assert meta.contiguous
    assert meta.order.tolist() == list(range(len(slots)))
    assert meta.segments == [(0, 4, 2), (1, 9, 1), (3, 0, 3), (5, 6, 1)]
    assert tiles_by_slot(meta) == expected_groups(slots)


@pytest.mark.parametrize("slots, message", [
    ([0, 1, 0], "slot 0 appears in more than one run"),
    ([2, -1, 2], "slot 2 appears in more than one run"),
])
def test_contiguous_claim_is_checked_on_cpu(slots, message):
    meta = LoRAMeta.allocate(8, 4, "cpu")
    with pytest.raises(ValueError, match=message):
        meta.update(slots, contiguous=True)


@pytest.mark.parametrize("slots", [[0, 4], [-2, 0]])
def test_slot_range_is_checked_on_cpu(slots):
    with pytest.raises(ValueError, match=r"token_slots values must be -1 or in \[0, 4\)"):
        LoRAMeta.allocate(8, 4, "cpu").update(slots)


def test_too_many_tokens_and_bad_input():
    meta = LoRAMeta.allocate(4, 2, "cpu")
    with pytest.raises(ValueError, match="5 tokens, more than max_tokens=4"):
        meta.update([0] * 5)
    with pytest.raises(ValueError, match="must be 1-D"):
        meta.update(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer tensor"):
        meta.update(torch.zeros(3))
    with pytest.raises(ValueError, match="block_m=1 needs"):
        meta.update([0, 1, 1], block_m=1)
    with pytest.raises(ValueError, match="block_m must be >= 1, got 0"):
        meta.update([0, 1, 1], block_m=0)


def test_buffers_are_reused_and_rewritten():
    meta = LoRAMeta.allocate(256, 12, "cpu")
    buffers = [meta.token_order, meta.tile_slot, meta.tile_start, meta.tile_len, meta.seg_slot]
    ptrs = [b.data_ptr() for b in buffers]
    gen = torch.Generator().manual_seed(0)
    for T, mix in [(133, "distinct"), (5, "identical"), (64, "zipf"), (0, "distinct"), (7, "no_adapter")]:
        slots = token_slots(mix, T, 12, gen)
        meta.update(slots)
        assert [b.data_ptr() for b in buffers] == ptrs
        assert tiles_by_slot(meta) == expected_groups(slots.tolist())
    assert meta.num_tokens == 7


def test_empty_step_and_all_no_adapter():
    meta = LoRAMeta.allocate(16, 4, "cpu")
    meta.update(torch.zeros(0, dtype=torch.int32))
    assert meta.num_tokens == 0 and meta.num_tiles == 0 and meta.segments == []
    meta.update([-1, -1, -1])
    assert meta.segments == []
    assert (meta.tile_slot[:meta.num_tiles] == -1).all()


def test_shape_class_and_block_m_follow_the_table():
    from loraplex.kernels.triton import configs

    meta = LoRAMeta.allocate(1024, 4, "cpu")
    meta.update([0] * configs.DECODE_MAX_TOKENS)
    assert meta.shape_class == "decode" and meta.block_m == configs.TABLE["decode"]["block_m"]
    meta.update([0] * (configs.DECODE_MAX_TOKENS + 1))
    assert meta.shape_class == "prefill" and meta.block_m == configs.TABLE["prefill"]["block_m"]


def test_workspace_is_a_view_of_reserved_scratch_and_grows_when_needed():
    meta = LoRAMeta.allocate(64, 4, "cpu", max_slices=3, max_rank=16).update([0] * 10)
    v = meta.workspace(3, 16)
    assert v.shape == (3, 10, 16) and v.dtype == torch.float32 and v.is_contiguous()
    assert v.data_ptr() == meta.workspace(2, 8).data_ptr()
    bare = LoRAMeta.allocate(64, 4, "cpu").update([0] * 10)
    assert bare.workspace(3, 64).shape == (3, 10, 64)


@pytest.mark.parametrize("seed", range(6))
def test_build_runs_writes_the_tables_build_writes(seed):
    """The decode graphs' fast path: same host tables and attributes as `build` on the same layout."""
    rng = random.Random(seed)
    max_slots = 8
    slots = sorted(rng.sample(range(max_slots), rng.randint(0, max_slots)))
    runs = [(slot, rng.randint(1, 40)) for slot in slots] + [(-1, rng.randint(0, 30))]
    if sum(length for _, length in runs) == 0:
        runs[-1] = (-1, 1)
    token_slots = [slot for slot, length in runs for _ in range(length)]
    expected = LoRAMeta.allocate(256, max_slots, "cpu").build(token_slots, contiguous=True)
    fast = LoRAMeta.allocate(256, max_slots, "cpu")
    fast.build([3] * 200, contiguous=True)  # stale tables underneath
    fast.build_runs(runs)
    for name in ("num_tokens", "block_m", "num_tiles", "shape_class", "contiguous", "segments"):
        assert getattr(fast, name) == getattr(expected, name), name
    live = {"token_slots": fast.num_tokens, "token_order": fast.num_tokens, "seg_slot": None, "seg_start": None,
            "seg_len": None, "tile_slot": fast.num_tiles, "tile_start": fast.num_tiles, "tile_len": fast.num_tiles}
    for name, n in live.items():
        assert torch.equal(fast._host_views[name][:n], expected._host_views[name][:n]), name


def test_build_runs_refuses_a_layout_that_is_not_ascending_runs():
    meta = LoRAMeta.allocate(64, 4, "cpu")
    for runs in ([(2, 3), (1, 3)], [(-1, 2), (0, 2)], [(4, 1)], [(1, 2), (1, 2)]):
        with pytest.raises(ValueError, match="ascending"):
            meta.build_runs(runs)
