"""The C kernel for CPU float32 lora_apply (kernels/cpu/cpu_lora.c via kernels/cpu/native.py) against the
torch reference: every mix of slots, ranks (rank padding NaN-poisoned, rank-0 slices with NaN
scalings), slice layouts, token orders and segment lengths; strided y; threads; and its build."""

from __future__ import annotations

import pytest
import torch

import loraplex.kernels as K
from loraplex.kernels import ops, testing
from loraplex.kernels.cpu import backend as cpu_backend
from loraplex.kernels.cpu import native
from tests.kernels.cases import TOLERANCE, layout, make_problem

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C kernel unavailable: {native.unavailable_reason()}")


def _expected(p):
    v = testing.shrink_reference(p.x, p.A, p.ranks, p.slots)
    return testing.expand_reference(v, p.B_t, p.ranks, p.scalings, p.slots, p.y0.clone(), p.offsets, p.widths)


@pytest.mark.parametrize("T", [1, 5, 16, 37, 130])
@pytest.mark.parametrize("mix", ["distinct", "identical", "zipf", "no_adapter"])
@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(T, mix, num_slices, contiguous):
    p, contiguous = layout(make_problem(T, 72, num_slices, mix, torch.float32, seed=T * 7 + num_slices),
                           contiguous)
    meta = K.LoRAMeta.allocate(256, p.A.shape[1], "cpu").update(p.slots, contiguous=contiguous)
    y = p.y0.clone()
    assert native.lora_apply(p.x, y, p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths) is y
    torch.testing.assert_close(y, _expected(p), **TOLERANCE[torch.float32])
    untouched = ~p.touched()
    assert torch.equal(y[untouched], p.y0[untouched])  # slot -1 tokens and rank-0 slices: bit for bit


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_result(threads):
    p, _ = layout(make_problem(64, 96, 3, "zipf", torch.float32, seed=3), contiguous=False)
    meta = K.LoRAMeta.allocate(64, p.A.shape[1], "cpu").update(p.slots)
    torch.set_num_threads(threads)  # the kernel conftest restores it
    y = p.y0.clone()
    native.lora_apply(p.x, y, p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)
    torch.set_num_threads(1)
    y1 = p.y0.clone()
    native.lora_apply(p.x, y1, p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)
    assert torch.equal(y, y1)  # items own their rows: the split over threads changes no sum


def test_strided_output_and_input_rows():
    """y a column block of a wider output (as the fused q/k/v output is); x rows of a wider tensor."""
    p = make_problem(9, 64, 2, "distinct", torch.float32, seed=11)
    meta = K.LoRAMeta.allocate(16, p.A.shape[1], "cpu").update(p.slots)
    wide_y = torch.randn(9, p.y0.shape[1] + 40)
    wide_y[:, 20:20 + p.y0.shape[1]] = p.y0
    wide_x = torch.randn(9, 64 + 8)
    wide_x[:, :64] = p.x
    before = wide_y.clone()
    native.lora_apply(wide_x[:, :64], wide_y[:, 20:20 + p.y0.shape[1]], p.A, p.B_t, p.ranks, p.scalings, meta,
                      p.offsets, p.widths)
    torch.testing.assert_close(wide_y[:, 20:20 + p.y0.shape[1]], _expected(p), **TOLERANCE[torch.float32])
    assert torch.equal(wide_y[:, :20], before[:, :20]) and torch.equal(wide_y[:, -20:], before[:, -20:])


def test_lora_apply_picks_native_for_short_segments_only(monkeypatch):
    calls: list[str] = []
    real = native.lora_apply
    monkeypatch.setattr(native, "lora_apply", lambda *a, **k: calls.append("native") or real(*a, **k))
    for T, mix, expected in ((12, "distinct", ["native"]), (cpu_backend.NATIVE_MAX_SEGMENT + 1, "identical", [])):
        calls.clear()
        p, _ = layout(make_problem(T, 64, 2, mix, torch.float32, seed=2), contiguous=True)
        meta = K.LoRAMeta.allocate(256, p.A.shape[1], "cpu").update(p.slots, contiguous=True)
        y = p.y0.clone()
        ops.lora_apply(p.x, y, p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)
        assert calls == expected
        torch.testing.assert_close(y, _expected(p), **TOLERANCE[torch.float32])


def test_forced_native_refuses_other_dtypes(monkeypatch):
    monkeypatch.setenv(K.BACKEND_ENV, "native")
    p = make_problem(4, 64, 1, "distinct", torch.float16, seed=1)
    meta = K.LoRAMeta.allocate(8, p.A.shape[1], "cpu").update(p.slots)
    with pytest.raises(ValueError, match="native runs float32 CPU tensors only"):
        ops.lora_apply(p.x, p.y0.clone(), p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)


def test_bad_shapes_are_refused_before_the_call():
    p = make_problem(4, 64, 2, "distinct", torch.float32, seed=1)
    meta = K.LoRAMeta.allocate(8, p.A.shape[1], "cpu").update(p.slots)
    with pytest.raises(ValueError, match="in_features"):
        native.lora_apply(torch.randn(4, 65), p.y0.clone(), p.A, p.B_t, p.ranks, p.scalings, meta,
                          p.offsets, p.widths)
    with pytest.raises(ValueError, match="meta was built for 4"):
        native.lora_apply(p.x[:3], p.y0[:3].clone(), p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)
    with pytest.raises(ValueError, match="contiguous"):
        native.lora_apply(p.x, p.y0.clone(), p.A.transpose(2, 3).contiguous().transpose(2, 3), p.B_t, p.ranks,
                          p.scalings, meta, p.offsets, p.widths)


def test_prepared_pool_matches_lora_apply_and_follows_in_place_writes():
    """prepare_pool checks a pool once; apply_prepared gives lora_apply's result, and sees the pool's
    contents as they are at the call (a serving pool is only ever written in place)."""
    p, _ = layout(make_problem(24, 64, 3, "zipf", torch.float32, seed=5), contiguous=False)
    meta = K.LoRAMeta.allocate(64, p.A.shape[1], "cpu").update(p.slots)
    pool = native.prepare_pool(p.A, p.B_t, p.ranks, p.scalings, p.y0.shape[1], p.offsets, p.widths)
    y = p.y0.clone()
    assert native.apply_prepared(p.x, y, pool, native.meta_args(meta)) is y
    torch.testing.assert_close(y, _expected(p), **TOLERANCE[torch.float32])
    p.B_t.mul_(2.0)
    y2 = p.y0.clone()
    native.apply_prepared(p.x, y2, pool, native.meta_args(meta))
    torch.testing.assert_close(y2 - p.y0, 2 * (y - p.y0), **TOLERANCE[torch.float32])


def test_prepared_pool_refusals():
    p = make_problem(4, 64, 2, "distinct", torch.float32, seed=1)
    meta = K.LoRAMeta.allocate(8, p.A.shape[1], "cpu").update(p.slots)
    with pytest.raises(ValueError, match="out_total"):
        native.prepare_pool(p.A, p.B_t, p.ranks, p.scalings, p.y0.shape[1] + 1, p.offsets, p.widths)
    with pytest.raises(TypeError, match="int32"):
        native.prepare_pool(p.A, p.B_t, p.ranks.long(), p.scalings, p.y0.shape[1], p.offsets, p.widths)
    pool = native.prepare_pool(p.A, p.B_t, p.ranks, p.scalings, p.y0.shape[1], p.offsets, p.widths)
    step = native.meta_args(meta)
    with pytest.raises(ValueError, match="do not fit the pool"):
        native.apply_prepared(torch.randn(4, 65), p.y0.clone(), pool, step)
    with pytest.raises(ValueError, match="meta was built for 4"):
        native.apply_prepared(p.x[:3], p.y0[:3].clone(), pool, step)
    with pytest.raises(ValueError, match="float32"):
        native.apply_prepared(p.x.double(), p.y0.clone(), pool, step)
    wide = K.LoRAMeta.allocate(8, p.A.shape[1] + 4, "cpu").update(p.slots)
    with pytest.raises(ValueError, match="max_slots"):
        native.apply_prepared(p.x, p.y0.clone(), pool, native.meta_args(wide))


def test_step_context_runs_the_backend_chosen_at_start_up(monkeypatch):
    """The serving layers' LoRA (LoRAStepContext.apply_lora) runs the backend the runner chose once, with
    the pool it prepared at wrap time; $LORAPLEX_LORA_BACKEND counts when a backend is chosen, not per step.
    Both LoRA paths give ops.lora_apply's result."""
    from loraplex.server.adapters.lora import LoRAPool, LoRAStepContext

    calls: list[str] = []
    real = native.apply_prepared
    monkeypatch.setattr(native, "apply_prepared", lambda *a, **k: calls.append("native") or real(*a, **k))
    p, _ = layout(make_problem(16, 64, 3, "distinct", torch.float32, seed=9), contiguous=True)
    meta = K.LoRAMeta.allocate(16, p.A.shape[1], "cpu").update(p.slots, contiguous=True)

    def run(backend):
        pool = LoRAPool(p.x.shape[1], list(p.widths), p.A.shape[1], p.A.shape[2], torch.float32, torch.device("cpu"))
        pool.a.copy_(p.A), pool.b_t.copy_(p.B_t), pool.ranks.copy_(p.ranks), pool.scale.copy_(p.scalings)
        pool.prepared = backend.prepare_pool(pool)
        context = LoRAStepContext(backend)
        context.begin(meta, kinds={"lora"})
        y = p.y0.clone()
        context.apply_lora(p.x, y, pool)
        torch.testing.assert_close(y, _expected(p), **TOLERANCE[torch.float32])

    chosen = K.select("cpu", torch.float32)
    run(chosen)
    assert calls == ["native"]
    monkeypatch.setenv(K.BACKEND_ENV, "torch")
    run(chosen)  # chosen before: still the C kernel
    assert calls == ["native", "native"]
    run(K.select("cpu", torch.float32))
    assert calls == ["native", "native"]


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    """No working compiler: one warning, available() is False, lora_apply runs the torch path."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_fn", None)
    assert not native.available()
    assert "no-such-cc" in native.unavailable_reason()
    p, _ = layout(make_problem(8, 64, 2, "distinct", torch.float32, seed=3), contiguous=True)
    meta = K.LoRAMeta.allocate(8, p.A.shape[1], "cpu").update(p.slots, contiguous=True)
    y = p.y0.clone()
    ops.lora_apply(p.x, y, p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)
    torch.testing.assert_close(y, _expected(p), **TOLERANCE[torch.float32])


def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_fn", None)
    assert native.available()
    built = list((tmp_path / "native").glob("cpu_lora-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_library", None)
    assert native.available()
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


@pytest.mark.parametrize("T, mix, contiguous", [(1, "distinct", True), (16, "distinct", True), (37, "zipf", False),
                                                (40, "identical", True)])
def test_bfloat16_pools_match_the_widened_weights(T, mix, contiguous):
    """bfloat16 pools (--adapter-dtype bfloat16), float32 x and y: the same as the reference run on the
    pools widened to float32 (widening is exact), whatever the segment length (lora_apply routes them
    all to the C kernel)."""
    p, contiguous = layout(make_problem(T, 72, 3, mix, torch.float32, seed=T), contiguous)
    A16, B16 = p.A.bfloat16(), p.B_t.bfloat16()
    meta = K.LoRAMeta.allocate(64, p.A.shape[1], "cpu").update(p.slots, contiguous=contiguous)
    y = p.y0.clone()
    ops.lora_apply(p.x, y, A16, B16, p.ranks, p.scalings, meta, p.offsets, p.widths)
    v = testing.shrink_reference(p.x, A16.float(), p.ranks, p.slots)
    expected = testing.expand_reference(v, B16.float(), p.ranks, p.scalings, p.slots, p.y0.clone(), p.offsets,
                                          p.widths)
    torch.testing.assert_close(y, expected, **TOLERANCE[torch.float32])
