"""`loraplex bench --scale`: many registered adapters, few device slots, zipf popularity.

Two engines on the same small model run the same requests, in alternating rounds:

- swapping: `slots` device slots and `host` adapters in host memory, so adapters move disk -> host
  (background loader) -> device slot (LRU) while the requests run;
- all-resident: a slot and a host copy for every adapter, all loaded into slots before timing.

Reports throughput of both and their ratio, and the latency of every adapter load of the swapping
runs per tier (the store's load listeners). The model and adapters are small on purpose (defaults:
hidden 256 × 4 layers, rank 8, float16 on disk: about 0.25 MB per adapter) so that 1,000 adapters
take a few hundred MB of disk and a minute to generate.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from loraplex.server.bench.workload import ALL_PROJECTIONS, ModelShape
from loraplex.server.errors import UserError


@dataclass(frozen=True)
class ScaleConfig:
    num_adapters: int = 1000
    slots: int = 16
    host: int = 64
    requests: int = 256
    concurrency: int = 32
    hidden_size: int = 256
    num_layers: int = 4
    rank: int = 8
    prompt_len: int = 32
    new_tokens: int = 32
    rounds: int = 3
    zipf_s: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.slots <= self.num_adapters:
            raise UserError(f"--scale-slots must be in [1, --scale-adapters], got {self.slots}")
        if not self.slots <= self.host:
            raise UserError(f"--scale-host ({self.host}) must be >= --scale-slots ({self.slots})")
        if min(self.requests, self.concurrency, self.rank, self.hidden_size, self.num_layers) < 1:
            raise UserError("scale sizes must be >= 1")

    @property
    def shape(self) -> ModelShape:
        return ModelShape(hidden_size=self.hidden_size, num_layers=self.num_layers,
                          intermediate_size=ModelShape.default_intermediate(self.hidden_size),
                          num_heads=max(1, self.hidden_size // 64), num_kv_heads=max(1, self.hidden_size // 128))


def prepare(config: ScaleConfig, workdir: Path, log) -> tuple[Path, dict[str, Path]]:
    from loraplex.server.bench.workload import build_adapters, build_model

    root = workdir / "scale"
    spec = {"shape": asdict(config.shape), "adapters": config.num_adapters, "rank": config.rank, "seed": config.seed}
    spec_file = root / "bench-spec.json"
    ids = [f"s{i:04d}" for i in range(config.num_adapters)]
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        log(f"reusing the scale model and {len(ids)} adapters in {root}")
    else:
        spec_file.unlink(missing_ok=True)
        log(f"generating the scale model and {len(ids)} rank-{config.rank} adapters in {root}")
        build_model(root / "model", config.shape, seed=config.seed)
        build_adapters(root / "model", root / "adapters", [config.rank] * config.num_adapters, ALL_PROJECTIONS,
                       seed=config.seed, save_dtype="float16", log=log)
        spec_file.write_text(json.dumps(spec))
    return root / "model", {adapter_id: root / "adapters" / f"a{i:04d}" for i, adapter_id in enumerate(ids)}


def make_engine(config: ScaleConfig, model_dir: Path, slots: int, host: int):
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from loraplex.server.engine.engine import LLMEngine

    per_request = config.prompt_len + config.new_tokens
    return LLMEngine(EngineConfig(
        model=ModelConfig(path=model_dir, dtype=config.dtype, device=config.device),
        cache=CacheConfig(block_size=16, num_tokens=max(4096, 2 * config.concurrency * per_request)),
        adapters=AdapterConfig(max_rank=config.rank, max_device_adapters=slots, max_host_adapters=host),
        scheduler=SchedulerConfig(max_num_seqs=config.concurrency, max_num_batched_tokens=2048,
                                  max_adapters=slots, max_model_len=4096),
        seed=config.seed,
    ))


def run_scale(config: ScaleConfig, workdir: Path, log) -> dict:
    from loraplex.server.bench.measure import median_ratio, now, percentile, round_orders, summarize
    from loraplex.server.bench.systems import LoraplexSystem
    from loraplex.server.bench.workload import draw_adapters, random_prompts

    model_dir, adapters = prepare(config, workdir, log)
    ids = list(adapters)
    disk = sum(f.stat().st_size for path in adapters.values() for f in path.iterdir())
    log(f"registering {len(ids)} adapters in two engines")
    systems = {}
    register_seconds: list[float] = []
    for name, slots, host in (("swapping", config.slots, config.host),
                              ("resident", config.num_adapters, config.num_adapters)):
        system = LoraplexSystem(make_engine(config, model_dir, slots, host))
        for adapter_id, path in adapters.items():
            started = now()
            system.engine.register_adapter(adapter_id, str(path))
            if name == "swapping":
                register_seconds.append(now() - started)
        systems[name] = system

    log("loading every adapter into a device slot of the all-resident engine")
    rng = random.Random(config.seed)
    resident = systems["resident"]
    for start in range(0, len(ids), config.concurrency):
        chunk = ids[start:start + config.concurrency]
        resident.run(random_prompts(config.shape.vocab_size, len(chunk), 4, rng), chunk, 1)
    assert resident.engine.store.loads["device"] >= len(ids), "not every adapter reached a device slot"

    loads: dict[str, list[float]] = {"host": [], "device": []}
    recording = [False]

    def on_load(tier: str, seconds: float) -> None:
        if recording[0]:
            loads[tier].append(seconds)

    systems["swapping"].engine.store.load_listeners.append(on_load)
    runs: dict[str, list] = {"swapping": [], "resident": []}
    orders = round_orders(["swapping", "resident"], 1 + config.rounds)
    for index, order in enumerate(orders):
        prompts = random_prompts(config.shape.vocab_size, config.requests, config.prompt_len, rng)
        picks = [ids[i] for i in draw_adapters("zipf", len(ids), config.requests, rng, config.zipf_s)]
        line = []
        for name in order:
            recording[0] = name == "swapping" and index > 0
            result = systems[name].run(prompts, picks, config.new_tokens)
            recording[0] = False
            line.append(f"{name} {result.throughput:.1f}")
            if index > 0:
                runs[name].append(result)
        log(("warm-up: " if index == 0 else f"round {index}/{config.rounds}: ") + ", ".join(line)
            + f" tok/s ({len(set(picks))} distinct adapters)")

    summaries = {}
    for name, slots, host in (("swapping", config.slots, config.host),
                              ("resident", config.num_adapters, config.num_adapters)):
        summary = summarize(f"{name}", runs[name], None).as_dict()
        summary.update(slots=slots, host=host)
        summaries[name] = summary
    for system in systems.values():
        system.close()
    return {
        "mode": "scale",
        "config": {**asdict(config), "shape": asdict(config.shape)},
        "systems": summaries,
        "swapped_over_resident": median_ratio(runs["swapping"], runs["resident"]),
        "loads": {tier: {"per_run": len(values) / config.rounds, "p50_s": percentile(values, 50),
                         "p99_s": percentile(values, 99)} for tier, values in loads.items()},
        "register": {"p50_s": percentile(register_seconds, 50), "p99_s": percentile(register_seconds, 99)},
        "disk_bytes": disk,
    }
