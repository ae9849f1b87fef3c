"""Classes of bug that break the CUDA path, shown on CPU: memory held across layers, DoRA norms that
copy a whole weight to float32 on the device, and threads that launch work without making the model's
device current."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loraplex.kernels import devices
from loraplex.server.adapters import loader as adapter_loader
from loraplex.server.config import EngineConfig, ModelConfig, CacheConfig
from loraplex.server.engine.engine import AsyncEngine, GenerationRequest
from loraplex.server.model.sampling import SamplingParams
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit


def test_unfused_groups_hold_nothing_after_a_layer(demo_model_dir, tmp_path):
    """4-bit base layers run their own forward and take the group's LoRA delta from a per-step cache:
    each entry must be gone once its last projection has read it, not kept until the step ends."""
    adapter = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=1, r=8, lora_alpha=16,
                                target_modules="all-linear")
    engine = make_engine(demo_model_dir, quantization="nf4")
    runner = engine.runner
    assert not any(module.group.fused for module in runner.lora_table.values())  # the unfused path
    held = []  # (projection, entries, bytes) after each down_proj, the last projection of a layer

    def after(module, args, output):
        cache = runner.lora_context.cache
        tensors = [t for entry in cache.values() for t in entry[:2] if isinstance(t, torch.Tensor)]
        held.append((len(cache), sum(t.numel() * t.element_size() for t in tensors)))

    for path, module in runner.lora_table.items():
        if path.endswith("down_proj"):
            module.register_forward_hook(after)
    engine.register_adapter("lora", str(adapter))
    collected = submit(engine, "r", PROMPTS[2], adapter="lora", max_new_tokens=3, ignore_eos=True)
    run_until_done(engine)
    assert len(collected.token_ids) == 3
    assert held and all(entry == (0, 0) for entry in held), held


class _Allocations(TorchDispatchMode):
    """Numel of every float32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.float32: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.float32 += [t.numel() for t in tree_flatten(out)[0]
                         if isinstance(t, torch.Tensor) and t.dtype == torch.float32]
        return out


def test_dora_norms_never_copy_a_whole_weight_to_float32(demo_model_dir, tmp_path, monkeypatch):
    """A half-precision base weight (as on a GPU): the norms are taken in bounded float32 blocks where
    the weight lives, and come back on the host."""
    from tests.engine_support import make_adapter

    adapter = make_adapter(demo_model_dir, tmp_path / "dora", "dora", seed=3)
    engine = make_engine(demo_model_dir)
    spec = engine.runner.base_spec
    weights = {path: spec.base_weight(path).to(torch.float16) for path in spec.targets}
    half_spec = dataclasses.replace(spec, base_weight=weights.__getitem__)
    exact = adapter_loader.load_adapter(adapter, dataclasses.replace(
        spec, base_weight=lambda path: weights[path].float()), max_rank=64)

    monkeypatch.setattr(adapter_loader, "DORA_BLOCK_ELEMENTS", 1000, raising=False)
    with _Allocations() as allocations:
        loaded = adapter_loader.load_adapter(adapter, half_spec, max_rank=64)
    smallest_weight = min(weights[path].numel() for path in loaded.dora_scale)
    assert loaded.dora_scale and max(allocations.float32) < smallest_weight
    for path, scale in loaded.dora_scale.items():
        assert scale.device.type == "cpu" and scale.dtype == torch.float32
        torch.testing.assert_close(scale, exact.dora_scale[path], rtol=1e-6, atol=1e-6)


def test_the_engine_thread_makes_the_model_device_current(demo_model_dir, monkeypatch):
    """Triton launches on the thread's current CUDA device: the step loop's thread (and a caller that
    steps the engine itself) must make the model's device current before running a step."""
    calls = []
    make_current = devices.make_current

    def record(device):
        calls.append((threading.current_thread().name, devices.normalize(device)))
        make_current(device)

    monkeypatch.setattr(devices, "make_current", record)
    config = EngineConfig(model=ModelConfig(path=demo_model_dir, device="cpu"), cache=CacheConfig(num_tokens=256))
    engine = AsyncEngine(config).start()
    try:
        async def one():
            request = GenerationRequest("r", prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=2))
            return [output async for output in engine.generate(request)]

        outputs = asyncio.run(one())
    finally:
        engine.shutdown()
    assert outputs[-1].finished
    assert ("loraplex-engine", engine.engine.runner.device) in calls
