"""The settings of one `loraplex bench` comparison, validated, and what they derive: the engine's config,
the settings as the result reports them, and whether they are the CPU target workload."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loraplex.server.bench.workload import ALL_PROJECTIONS, POPULARITY_LAWS, ModelShape
from loraplex.server.errors import UserError

# Targets of the CPU workload (the defaults), as ratios between the systems' throughputs.
TARGETS = {"mixed_over_base": 0.8, "mixed_over_peft": 4.0, "base_over_hf": 1.0}


@dataclass(frozen=True)
class BenchConfig:
    shape: ModelShape = field(default_factory=ModelShape)
    num_adapters: int = 16
    ranks: tuple[int, ...] = (16,)
    """Adapter i gets ranks[i % len(ranks)]: one value, or several for mixed ranks in one batch."""
    targets: tuple[str, ...] = ALL_PROJECTIONS
    popularity: str = "distinct"
    """How requests pick adapters: distinct, uniform or zipf."""
    zipf_s: float = 1.0
    batch: int = 16
    """Requests submitted together (concurrency)."""
    prompt_len: int = 32
    new_tokens: int = 32
    quantization: str = "none"
    dtype: str = "float32"
    adapter_dtype: str = "auto"
    """loraplex's LoRA storage (--adapter-dtype): auto = the model's dtype, or bfloat16."""
    device: str = "cpu"
    rounds: int = 5
    """Measured rounds; each runs every system once."""
    warmup: int = 1
    """Unmeasured rounds first (allocations, caches, lazy initialisation)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default, one per core)."""
    seed: int = 0
    peft: bool = True
    hf: bool = True

    def __post_init__(self) -> None:
        if self.popularity not in POPULARITY_LAWS:
            raise UserError(f"--popularity must be one of {', '.join(POPULARITY_LAWS)}, got {self.popularity!r}")
        for name in ("num_adapters", "batch", "prompt_len", "new_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("--warmup and --threads must be >= 0")
        if not self.ranks or min(self.ranks) < 1:
            raise UserError(f"--ranks must be positive integers, got {self.ranks}")
        if self.popularity == "distinct" and self.batch > self.num_adapters:
            raise UserError(f"--popularity distinct needs --adapters >= --batch ({self.batch}), got {self.num_adapters}")
        unknown = set(self.targets) - set(ALL_PROJECTIONS)
        if unknown:
            raise UserError(f"--targets: unknown projections {sorted(unknown)}; choose from {', '.join(ALL_PROJECTIONS)}")
        if self.quantization != "none" and not self.device.startswith("cuda") and self.dtype == "float16":
            raise UserError("4-/8-bit bases on CPU compute in float32 or bfloat16")

    @property
    def adapter_ranks(self) -> list[int]:
        return [self.ranks[i % len(self.ranks)] for i in range(self.num_adapters)]


def engine_config(config: BenchConfig, model_dir: Path, num_slots: int):
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig

    per_request = config.prompt_len + config.new_tokens
    return EngineConfig(
        model=ModelConfig(path=model_dir, quantization=config.quantization, dtype=config.dtype, device=config.device),
        cache=CacheConfig(block_size=16, num_tokens=max(4096, 2 * config.batch * per_request)),
        adapters=AdapterConfig(max_rank=max(config.ranks), max_device_adapters=num_slots,
                               max_host_adapters=num_slots, dtype=config.adapter_dtype),
        seed=config.seed,
    )


def is_target_workload(config: BenchConfig) -> bool:
    default = BenchConfig()
    return replace(config, rounds=default.rounds, warmup=default.warmup, threads=default.threads,
                   adapter_dtype=default.adapter_dtype,
                   seed=default.seed, peft=True, hf=True) == default


def bench_config_dict(config: BenchConfig) -> dict:
    data = asdict(config)
    data["shape"] = asdict(config.shape)
    data["ranks"] = list(config.ranks)
    data["targets"] = list(config.targets)
    return data
