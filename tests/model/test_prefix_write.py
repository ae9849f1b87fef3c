"""Writing a prefix-tuning adapter's keys/values into its blocks: one read of the host tier (on CUDA one
non-blocking copy from pinned memory), nothing made from Python data on the way, the same cache
contents as the slot-by-slot definition."""

from __future__ import annotations

import pytest
import torch

from tests.model.graph_record import RecordedForward
from tests.engine_support import make_engine

MADE_FROM_HOST_DATA = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten.scalar_tensor.default"}


@pytest.mark.parametrize("blocks, length", [([5, 6, 7], 37), ([9, 2], 20), ([3], 16), ([4, 5, 11, 12], 50)])
def test_prefix_kv_reaches_the_cache_in_one_read(demo_model_dir, blocks, length):
    engine = make_engine(demo_model_dir, block_size=16)
    runner = engine.runner
    heads, dim = runner.num_kv_heads, runner.head_dim
    # float64: on the CPU the copy to the device is then a copy too (to float32, the cache's dtype)
    prefix_kv = torch.randn(runner.num_layers, 2, heads, length, dim, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(length))
    recording = RecordedForward()
    with recording:
        runner.write_prefix(blocks, prefix_kv)
    reads = [op for op in recording.ops
             if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == prefix_kv.untyped_storage().data_ptr()
                    for t in torch.utils._pytree.tree_flatten(op[1:])[0])]
    assert len(reads) == 1, [str(op[0]) for op in reads]
    assert not {str(op[0]) for op in recording.ops} & MADE_FROM_HOST_DATA
    bs = runner.block_size
    for position in range(length):
        slot = blocks[position // bs] * bs + position % bs
        for layer in range(runner.num_layers):
            assert torch.equal(runner.kv_cache.k[layer][slot], prefix_kv[layer, 0, :, position].float())
            assert torch.equal(runner.kv_cache.v[layer][slot], prefix_kv[layer, 1, :, position].float())
