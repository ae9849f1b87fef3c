"""Read a PEFT adapter directory and check that it fits the served base model.

A LoRA adapter on disk is `adapter_config.json` + `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). Ranks come from the tensor shapes; each module's scaling is `alpha / r` (`alpha / sqrt(r)`
with rsLoRA), alpha taken from `alpha_pattern` the way peft matches it (regex `(.*\\.)?{key}$`).

Everything an adapter could ask for that the server cannot reproduce exactly is refused here, at
registration, with `FailedPrecondition` naming the cause — never served approximately.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.server.errors import FailedPrecondition, NotFound

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# init schemes that rewrite the base weights when the adapter is created: the adapter is only
# correct on top of that rewritten base, which the server does not have.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoraConfig fields that change the forward pass (or the base) when set; any truthy value is refused.
_UNSUPPORTED_LORA_OPTIONS = {
    "modules_to_save": "modules_to_save (fully trained copies of base modules, e.g. the head or embeddings)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "use_bdlora",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "kasa_config",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "velora_config",
    "lora_ga_config": "LoRA-GA (lora_ga_config)",
    "corda_config": "CorDA (corda_config)",
    "loftq_config": "LoftQ (loftq_config)",
    "megatron_config": "megatron_config",
    "use_dora": "DoRA (use_dora)",
}


@dataclass
class LoRAModuleWeights:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class AdapterWeights:
    """A converted adapter in host memory, ready to be copied into device slots."""

    peft_type: str
    source: Path
    config: dict
    lora: dict[str, LoRAModuleWeights] = field(default_factory=dict)  # module path -> weights

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.lora.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({path.rsplit(".", 1)[-1] for path in self.lora})

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.lora.values() for t in (m.a, m.b))


def read_config(source: Path) -> dict:
    path = source / CONFIG_FILE
    if not source.is_dir():
        raise NotFound(f"adapter source {source} is not a directory")
    if not path.is_file():
        raise FailedPrecondition(f"{source} has no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FailedPrecondition(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise FailedPrecondition(f"{path} has no peft_type")
    return config


def read_tensors(source: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_path, pickle_path = source / SAFETENSORS_FILE, source / PICKLE_FILE
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise FailedPrecondition(f"{safetensors_path} cannot be read: {error}") from None
    if pickle_path.is_file():
        if not allow_pickle:
            raise FailedPrecondition(
                f"{source} holds only a pickled {PICKLE_FILE}; pickles can run code when loaded, so they are "
                f"refused (convert it to {SAFETENSORS_FILE}, or start the server with pickles allowed)"
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FailedPrecondition(f"{source} has no {SAFETENSORS_FILE}")


def pattern_value(patterns: dict, module_path: str, default):
    """The value peft uses for `module_path`: the first pattern key matching `(.*\\.)?{key}$`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _check_lora_options(config: dict, source: Path) -> None:
    for option, label in _UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(option):
            raise FailedPrecondition(f"adapter {source} uses {label}, which loraplex does not serve")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise FailedPrecondition(
            f"adapter {source} was initialised with init_lora_weights={init!r}, which rewrites the base "
            "weights; it is only correct on that modified base (convert it to a plain LoRA first)"
        )


def load_lora(
    source: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    targets: dict[str, tuple[int, int]],
    max_rank: int,
) -> AdapterWeights:
    """Build the per-module LoRA weights; `targets` maps each servable module path to (in, out)."""
    _check_lora_options(config, source)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(KEY_PREFIX))
        if match is None:
            others.append(key)
        else:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise FailedPrecondition(f"adapter {source} holds no LoRA weights")

    adapter = AdapterWeights(peft_type="LORA", source=source, config=config)
    alpha_default = config.get("lora_alpha", 8)
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise FailedPrecondition(f"adapter {source}: module {path} has lora_{''.join(pair)} but not both A and B")
        if path not in targets:
            raise FailedPrecondition(
                f"adapter {source} targets {path}, which is not a linear projection of this base model's "
                "decoder layers (was it trained for another model?)"
            )
        a, b = pair["A"], pair["B"]
        in_features, out_features = targets[path]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise FailedPrecondition(
                f"adapter {source}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base "
                f"module maps {in_features} -> {out_features} features (expected [r, {in_features}] and "
                f"[{out_features}, r]); the adapter was made for another model"
            )
        if rank > max_rank:
            raise FailedPrecondition(
                f"adapter {source}: {path} has rank {rank}, above the server's max_rank {max_rank}"
            )
        alpha = pattern_value(config.get("alpha_pattern"), path, alpha_default)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.lora[path] = LoRAModuleWeights(a=a.float().contiguous(), b=b.float().contiguous(), scaling=scaling)
    if others:
        raise FailedPrecondition(
            f"adapter {source} holds tensor {others[0]!r}, which is not a lora_A/lora_B weight "
            "(embedding LoRA, saved modules and biases are not served)"
        )
    return adapter


def load_adapter(
    source: Path, targets: dict[str, tuple[int, int]], max_rank: int, allow_pickle: bool = False
) -> AdapterWeights:
    """Read and validate the adapter at `source` against the base model's servable modules."""
    config = read_config(source)
    peft_type = str(config["peft_type"]).upper()
    if peft_type != "LORA":
        raise FailedPrecondition(f"adapter {source} is of type {peft_type}, which this server does not serve yet")
    tensors = read_tensors(source, allow_pickle)
    return load_lora(source, config, tensors, targets, max_rank)
