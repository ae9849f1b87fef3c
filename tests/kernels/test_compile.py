"""The kernels compile for an H100 (sm_90) down to a cubin, with no GPU attached.

The interpreter runs the kernels as Python, so it cannot catch what only the compiler rejects
(types of scalar selects, early returns, loops bounded by a loaded rank, bf16 dots, atomics).
Triton's CUDA backend and ptxas ship in the triton wheel; this test fails if they are missing.
"""

from __future__ import annotations

import re

import pytest

from loraplex.kernels.triton import configs

triton_compiler = pytest.importorskip("triton.compiler")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from loraplex.kernels.triton.expand import _expand_kernel  # noqa: E402
from loraplex.kernels.triton.shrink import _shrink_kernel  # noqa: E402
from loraplex.kernels.triton import attention_configs  # noqa: E402
from loraplex.kernels.triton.paged_attention import _combine_kernel, _paged_attention_kernel, tile_shape  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
ATOMICS = re.compile(r"^\s*(@%p\d+\s+)?(atom|red)\.", re.M)  # PTX atomic instructions, predicated or not
INDEX = ("tile_slot_ptr", "tile_start_ptr", "tile_len_ptr", "token_order_ptr", "ranks_ptr")


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch, pristine_triton_language):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def compile_for_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    kernel = JITFunction(kernel.fn)  # compiled flavour, whatever TRITON_INTERPRET was at import
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: "*i32" for name in INDEX})
    signature.update(pointers)
    signature.update({name: "constexpr" for name in constexprs})
    src = triton_compiler.ASTSource(kernel, signature, constexprs=constexprs)
    return triton_compiler.compile(src, target=SM90, options=dict(num_warps=num_warps, num_stages=num_stages))


def table_cases():
    for shape_class in configs.SHAPE_CLASSES:
        for dtype in ("bf16", "fp16", "fp32"):
            yield shape_class, dtype


@pytest.mark.parametrize("shape_class, dtype", list(table_cases()))
def test_table_configs_compile_for_sm90(shape_class, dtype):
    entry = configs.TABLE[shape_class]
    s = entry["shrink"]
    for even_k in (True, False):
        k = compile_for_sm90(
            _shrink_kernel, {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "v_ptr": "*fp32"},
            dict(BLOCK_M=entry["block_m"], BLOCK_N=s["block_n"], BLOCK_K=s["block_k"], SPLIT_K=s["split_k"],
                 EVEN_K=even_k, FP32_DOT=dtype == "fp32"),
            s["num_warps"], s["num_stages"])
        assert len(k.asm["cubin"]) > 0
        # the default path is deterministic: no float atomics whose order varies between runs
        assert not ATOMICS.search(k.asm["ptx"])
    e = entry["expand"]
    k = compile_for_sm90(
        _expand_kernel, {"v_ptr": "*fp32", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "scalings_ptr": "*fp32"},
        dict(BLOCK_M=entry["block_m"], BLOCK_N=e["block_n"], BLOCK_R=e["block_r"], FP32_DOT=dtype == "fp32"),
        e["num_warps"], e["num_stages"])
    assert len(k.asm["cubin"]) > 0
    assert not ATOMICS.search(k.asm["ptx"])


def test_expand_compiles_with_v_in_the_weight_dtype_and_plain_shrink_stores():
    k = compile_for_sm90(
        _expand_kernel, {"v_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "scalings_ptr": "*fp32"},
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=32, FP32_DOT=False), 4, 2)
    assert len(k.asm["cubin"]) > 0
    k = compile_for_sm90(
        _shrink_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "v_ptr": "*fp32"},
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, EVEN_K=False, FP32_DOT=False), 4, 2)
    assert "atom" not in k.asm["ptx"]  # split_k=1 stores plainly: deterministic, no zeroing needed


# each table entry in bf16, the prefix-skip and window paths, the float32 (ieee dot) path with keys split
# over programs and merged; ~10 s per compile
@pytest.mark.parametrize("shape_class, dtype, has_skip, splits", [("decode", "bf16", False, 1),
                                                                  ("prefill", "bf16", True, 1),
                                                                  ("decode", "fp32", True, 4)])
def test_paged_attention_compiles_for_sm90(shape_class, dtype, has_skip, splits):
    cfg = attention_configs.TABLE[shape_class]
    # 32 query heads over 8 KV heads, head_dim 128 (Llama-3-8B)
    tile = tile_shape(4, 1 if shape_class == "decode" else 512, cfg)
    heads = dict(HEAD_DIM=128, HEAD_PAD=128, NUM_SPLITS=splits)
    attention = compile_kernel(_paged_attention_kernel, dtype, ("q_ptr", "k_ptr", "v_ptr", "o_ptr"),
                               tile | heads | dict(BLOCK_SIZE=16, HAS_SKIP=has_skip, HAS_WINDOW=has_skip, FP32_DOT=dtype == "fp32"),
                               cfg["num_warps"], cfg["num_stages"])
    assert len(attention.asm["cubin"]) > 0
    if splits > 1:
        combine = compile_kernel(_combine_kernel, dtype, ("o_ptr",),
                                 {name: tile[name] for name in ("GROUP", "GROUP_PAD", "BLOCK_M")} | heads, 4, 1)
        assert len(combine.asm["cubin"]) > 0


def compile_kernel(kernel, dtype: str, data: tuple[str, ...], constexprs: dict, num_warps: int, num_stages: int):
    """The paged attention kernels for sm_90: `data` pointers in `dtype`, int32 tables, fp32 partials."""
    kernel = JITFunction(kernel.fn)
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: "*i32" for name in kernel.arg_names if name.endswith("_ptr")})
    signature.update({name: "*fp32" for name in ("part_acc_ptr", "part_ml_ptr") if name in signature})
    signature.update({name: f"*{dtype}" for name in data})
    if "qk_scale" in signature:
        signature["qk_scale"] = "fp32"
    signature.update({name: "constexpr" for name in constexprs})
    src = triton_compiler.ASTSource(kernel, signature, constexprs=constexprs)
    return triton_compiler.compile(src, target=SM90, options=dict(num_warps=num_warps, num_stages=num_stages))
