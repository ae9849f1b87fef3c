"""Engine configuration: one frozen, validated dataclass per concern.

The CLI (and tests) build an `EngineConfig` once and pass it down; nothing reads globals.
`SchedulerConfig` lives in `scheduler.py` beside the code it configures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.kernels import devices
from loraplex.server.model.quantization import INT8_THRESHOLD
from loraplex.server.engine.scheduler import SchedulerConfig

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = ("float32", "float16", "bfloat16")
ADAPTER_DTYPES = ("auto", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    """A local Hugging Face causal-LM directory (config.json, weights, tokenizer)."""
    quantization: str = "none"
    """Base weights: "nf4" (4-bit NormalFloat, double quant, as QLoRA), "int8" (LLM.int8) or "none"."""
    dtype: str = "float32"
    """Compute dtype of activations, LoRA weights and (unquantized) base weights."""
    device: str = "cpu"
    """"cpu" or "cuda[:N]"; kept as the device tensors report ("cuda" becomes "cuda:0", the current device)."""
    int8_threshold: float = INT8_THRESHOLD
    """LLM.int8's outlier threshold: 0 (pure vector-wise int8) keeps every request's tokens independent
    of the batch; bitsandbytes' 6.0 takes outlier columns, chosen over the whole batch, in 16 bits."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        object.__setattr__(self, "device", str(devices.normalize(device)))
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


def check_adapter_dtype(adapter_dtype: str, dtype: str, device: str) -> None:
    """Raise ValueError unless `adapter_dtype` can store the adapters of a `dtype` model on `device`:
    "auto" always; "bfloat16" for a float32 model on CPU, with the C kernel built (the only path that
    takes bfloat16 pools with float32 activations)."""
    if adapter_dtype == "auto":
        return
    if device.split(":")[0] != "cpu" or dtype != "float32":
        raise ValueError(f"--adapter-dtype {adapter_dtype} is for a float32 model on CPU, got --dtype {dtype} on "
                         f"{device} (on a GPU, serve the model itself in bfloat16)")
    from loraplex.kernels.cpu import native

    if not native.available():
        raise ValueError(f"--adapter-dtype {adapter_dtype} needs the CPU LoRA kernel, which could not be built: "
                         f"{native.unavailable_reason()}")


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
