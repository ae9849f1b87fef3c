"""Host <-> device synchronisations of an engine step, counted on CPU: every device read that loraplex
code makes (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, a tensor in `bool`/`int`/`float`) and every
tensor it creates from host data on the device. A step may read the sampled tokens once and send its
metadata in one copy (`StepBuffers.send`); the LoRA layout is built on the host (`LoRAMeta.build`)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from loraplex.kernels import meta as meta_module
from loraplex.server.model import step_buffers
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit

ROOT = Path(meta_module.__file__).resolve().parents[1]
# the step's device-side code on every platform (CPU-only C kernels and their bindings are not on a GPU's path)
WATCHED = [ROOT / "server" / "model", ROOT / "server" / "engine", ROOT / "server" / "adapters" / "lora.py",
           ROOT / "kernels" / "meta.py", ROOT / "kernels" / "ops.py", ROOT / "kernels" / "exponential_race.py",
           ROOT / "kernels" / "triton" / "exponential_race.py"]
HOST_ONLY = {("meta.py", "build"), ("meta.py", "_check"), ("step_buffers.py", "put")}
"""Functions that work on host tensors by construction."""
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def _caller() -> tuple[Path, str] | None:
    frame = sys._getframe(2)
    path = Path(frame.f_code.co_filename).resolve()
    if any(path == w or w in path.parents for w in WATCHED):
        return path, frame.f_code.co_name
    return None


class Counts(Counter):
    """What the step loop did, counted from `start()` on (after the engine is built: transformers builds
    its models under a device context that a wrapped `torch.tensor` would escape, leaving buffers such as
    the rotary `inv_freq` uninitialised)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self._monkeypatch = monkeypatch

    def start(self) -> None:
        self.clear()
        counts, monkeypatch = self, self._monkeypatch

        def reader(name, original):
            def read(self, *args, **kwargs):
                where = _caller()
                if where is not None and (where[0].name, where[1]) not in HOST_ONLY:
                    counts[f"{where[0].name}:{where[1]}:{name}"] += 1
                return original(self, *args, **kwargs)
            return read

        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, reader(name, getattr(torch.Tensor, name)))

        def creator(name, original):
            def create(*args, **kwargs):
                where = _caller()
                if where is not None and kwargs.get("device") is not None:
                    counts[f"{where[0].name}:{where[1]}:{name}(device=)"] += 1
                return original(*args, **kwargs)
            return create

        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, creator(name, getattr(torch, name)))
        send = step_buffers.StepBuffers.send

        def counted_send(self, *args):
            counts["send"] += 1
            return send(self, *args)

        monkeypatch.setattr(step_buffers.StepBuffers, "send", counted_send)


@pytest.fixture
def counted(monkeypatch):
    return Counts(monkeypatch)


def test_a_step_reads_the_device_once_and_sends_its_metadata_once(demo_model_dir, tmp_path, counted, monkeypatch):
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "torch")  # the C kernel's bindings are CPU-only
    adapter = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=3, r=4, lora_alpha=8,
                                target_modules="all-linear", use_dora=True)
    runs = []
    for count in (False, True):  # the same requests uncounted, then counted: counting changes nothing
        engine = make_engine(demo_model_dir)
        engine.register_adapter("a", str(adapter))
        requests = [submit(engine, f"r{i}", PROMPTS[i], adapter="a" if i % 2 else None, max_new_tokens=4,
                           ignore_eos=True) for i in range(3)]
        engine.step()  # adapter loads and first-use allocations happen here
        if count:
            counted.start()
        steps = run_until_done(engine)
        runs.append([r.token_ids for r in requests])
    assert runs[0] == runs[1]
    assert steps >= 3
    sampler_reads = {key: n for key, n in counted.items() if key.startswith("sampling.py:")}
    others = {key: n for key, n in counted.items() if key != "send" and key not in sampler_reads}
    assert others == {}, f"device reads or host->device tensors in the step loop: {others}"
    assert counted["send"] == steps
    assert sum(sampler_reads.values()) == steps, sampler_reads  # tokens and logprobs in one transfer


# (request id, prompt, adapter, sampling): every sampling path at once, over several steps
MIXED = [
    ("greedy", 0, None, dict(max_new_tokens=5)),
    ("seeded", 1, "a", dict(temperature=0.8, seed=5, max_new_tokens=6)),
    ("filtered", 2, None, dict(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=6)),
    ("penalised-greedy", 3, "a", dict(repetition_penalty=1.3, stop=["the", "ea"], max_new_tokens=6)),
    ("everything", 4, None, dict(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.2, seed=2**64 - 1,
                                 stop=["?"], max_new_tokens=5)),
    ("low-penalty", 0, "a", dict(temperature=1.2, top_p=0.5, repetition_penalty=0.8, max_new_tokens=4)),
]


def test_mixed_sampling_reads_the_device_once_a_step_and_sends_its_parameters_with_the_step(
        demo_model_dir, tmp_path, counted):
    """Greedy, temperature, top-k/top-p, repetition penalty, seeds, stop strings and logprobs in one batch,
    with requests joining mid-way (their first penalised step sends the whole history): each step still
    sends once and reads the device once, the sampler's tokens and logprobs."""
    adapter = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=4, r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"])
    engine = make_engine(demo_model_dir)
    engine.register_adapter("a", str(adapter))
    requests = [submit(engine, rid, PROMPTS[p], adapter=a, ignore_eos=True, **s) for rid, p, a, s in MIXED[:4]]
    engine.step()  # the adapter's load and first-use allocations happen here
    counted.start()
    steps = 0
    for _ in range(2):
        assert engine.step() is not None
        steps += 1
    requests += [submit(engine, rid, PROMPTS[p], adapter=a, ignore_eos=True, **s) for rid, p, a, s in MIXED[4:]]
    steps += run_until_done(engine)
    finals = [r.final for r in requests]
    assert all(f.error is None and f.finish_reason in ("length", "stop") for f in finals), finals
    assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in requests)
    assert steps >= 5
    others = {key: n for key, n in counted.items() if key != "send" and not key.startswith("sampling.py:")}
    assert others == {}, f"device reads or host->device tensors in the step loop: {others}"
    assert counted["send"] == steps
    sampler = {key: n for key, n in counted.items() if key.startswith("sampling.py:")}
    assert sampler == {"sampling.py:sample:tolist": steps}  # tokens and logprobs, one transfer a step
