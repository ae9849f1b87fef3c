"""Engine configuration: one frozen, validated dataclass per concern.

The CLI (and tests) build an `EngineConfig` once and pass it down; nothing reads globals.
This is the bottom floor: it imports only the standard library, so every layer above (api, engine,
model, adapters) can import it. What needs torch or a kernel (making "cuda" the current device,
checking that the CPU kernel is built) is checked where those are: the CLI and the model runner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = ("float32", "float16", "bfloat16")
ADAPTER_DTYPES = ("auto", "bfloat16")

# LLM.int8's outlier threshold: 0 quantizes every input column vector-wise, so each row's result is its
# own; above 0, columns whose magnitude in ANY row of the batch exceeds it run in 16 bits, so a row's
# result depends on the other rows (the other requests of the step).
INT8_THRESHOLD = 0.0

_DEVICE = re.compile(r"(cpu|cuda)(:[0-9]+)?")


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    """A local Hugging Face causal-LM directory (config.json, weights, tokenizer)."""
    quantization: str = "none"
    """Base weights: "nf4" (4-bit NormalFloat, double quant, as QLoRA), "int8" (LLM.int8) or "none"."""
    dtype: str = "float32"
    """Compute dtype of activations, LoRA weights and (unquantized) base weights."""
    device: str = "cpu"
    """"cpu" or "cuda[:N]"; "cpu:N" is kept as "cpu", what CPU tensors report. A bare "cuda" is kept as
    given: the CLI and the model runner make it the current CUDA device (`kernels.devices.normalize`)."""
    int8_threshold: float = INT8_THRESHOLD
    """LLM.int8's outlier threshold: 0 (pure vector-wise int8) keeps every request's tokens independent
    of the batch; bitsandbytes' 6.0 takes outlier columns, chosen over the whole batch, in 16 bits."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        device = _DEVICE.fullmatch(str(self.device))
        if device is None:
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        object.__setattr__(self, "device", "cpu" if device.group(1) == "cpu" else device.group(0))
        if not self.int8_threshold >= 0.0:
            raise ValueError(f"int8_threshold must be >= 0, got {self.int8_threshold}")

    @property
    def batch_invariant(self) -> bool:
        """Whether a request's tokens are independent of the other requests in its batches: float32 on
        CPU (the tests check it for every quantization and adapter type), unless LLM.int8 picks outlier
        columns over the batch. Half precision reorders reductions with the batch; GPUs are unmeasured."""
        return (self.device == "cpu" and self.dtype == "float32"
                and not (self.quantization == "int8" and self.int8_threshold > 0))


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_tokens: int | None = None
    """KV capacity in tokens (rounded up to whole blocks); None: derive from memory_fraction."""
    memory_fraction: float = 0.9
    """On CUDA without num_tokens: fraction of free device memory (after weights) given to the KV cache."""
    prefix_caching: bool = True
    """Keep the KV of full prompt blocks for later requests of the same adapter with the same prefix."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_tokens is not None and self.num_tokens < self.block_size:
            raise ValueError(f"num_tokens must be >= block_size ({self.block_size}), got {self.num_tokens}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class AdapterConfig:
    max_rank: int = 64
    """Largest LoRA rank served; bigger adapters are refused at registration."""
    max_device_adapters: int = 8
    """Device slots: distinct adapters that can run in one step."""
    max_host_adapters: int = 32
    """Adapters kept converted in host memory (LRU beyond this)."""
    adapter_root: Path | None = None
    """If set, adapter sources must resolve inside this directory."""
    adapter_repo: Path | None = None
    """If set, an unregistered adapter id is registered on first use from `<adapter_repo>/<id>/`."""
    allow_pickle: bool = False
    """Accept pickled adapter_model.bin files (arbitrary code on load: off by default)."""
    dtype: str = "auto"
    """How LoRA weights are stored in the device slots: "auto" (the model's dtype: exact) or
    "bfloat16" (a float32 model on CPU only: half the bytes a decode step reads; the weights are
    rounded to bfloat16 once, computed in float32)."""

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.max_device_adapters < 1:
            raise ValueError(f"max_device_adapters must be >= 1, got {self.max_device_adapters}")
        if self.max_host_adapters < self.max_device_adapters:
            raise ValueError(
                f"max_host_adapters ({self.max_host_adapters}) must be >= max_device_adapters "
                f"({self.max_device_adapters}): device slots are filled from host memory"
            )
        if self.dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter dtype must be one of {ADAPTER_DTYPES}, got {self.dtype!r}")
        for name in ("adapter_root", "adapter_repo"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).resolve())


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences running (holding KV blocks) at once."""
    max_num_batched_tokens: int = 2048
    """Most positions computed in one step; longer prefills are chunked. At least max_num_seqs."""
    max_adapters: int = 8
    """Most distinct adapters (the base model not counted) among running sequences: device slots."""
    max_model_len: int = 2048
    """Most positions per sequence: virtual + prompt + max_new_tokens."""
    max_bypass_steps: int = 16
    """Steps in which later arrivals may be admitted ahead of a sequence blocked on KV blocks or
    adapter slots; after that they wait behind it (0: strict first come first served)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            minimum = 0 if f.name == "max_bypass_steps" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{f.name} must be an integer >= {minimum}, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running sequence gets its token each step"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    scheduler: SchedulerConfig | None = None
    """None: derived from the model (max_model_len) and the adapter slots."""
    seed: int = 0
    """Seeds the engine's RNG that draws a seed for each sampled request that brings none."""
    enforce_eager: bool = False
    """Run decode steps eagerly on CUDA too (no CUDA graphs: for debugging and profiling)."""
