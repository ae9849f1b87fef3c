"""Read a PEFT adapter directory, check that it fits the served base model, convert it for serving.

Every type is converted at load to what the server applies per token:

| peft_type               | on disk                                   | served as                                  |
| LORA (QLoRA, rsLoRA)    | lora_A [r, in], lora_B [out, r]           | A, B, scaling alpha/r (alpha/sqrt(r))      |
| LORA with use_dora      | + lora_magnitude_vector m [out]           | LoRA, then rows scaled by g = m/‖W+sBA‖    |
| ADALORA                 | lora_A [r, in], lora_E [r, 1], lora_B     | LoRA A' = E·A, scaling alpha/(init_r+1e-5) |
| IA3                     | ia3_l [1, in] (feed-forward) or [out, 1]  | per-token input or output scale vectors    |
| PROMPT_TUNING, P_TUNING | prompt_embeddings [P, hidden]             | P virtual input embeddings                 |
| PREFIX_TUNING           | prompt_embeddings [P, layers·2·kv·hd]     | per layer K, V [kv_heads, P, head_dim]     |

A LoRA adapter on disk is `adapter_config.json` + `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). Ranks come from the tensor shapes; each module's scaling is `alpha / r` (`alpha / sqrt(r)`
with rsLoRA), alpha taken from `alpha_pattern` the way peft matches it (regex `(.*\\.)?{key}$`).

Everything an adapter could ask for that the server cannot reproduce exactly is refused here, at
registration, with `FailedPrecondition` naming the cause — never served approximately.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loraplex.kernels import devices
from loraplex.server.adapters.kind import AdapterKind
from loraplex.server.adapters.validation import parse_config, validate_adapter
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
}
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
SUPPORTED_TYPES = ("LORA", "ADALORA", "IA3", "PREFIX_TUNING", *PROMPT_TYPES)


@dataclass(frozen=True)
class BaseModelSpec:
    """What the loader needs to know about the served base model."""

    targets: dict[str, tuple[int, int]]
    """Servable projection path -> (in_features, out_features)."""
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    base_weight: Callable[[str], torch.Tensor]
    """Dequantized weight [out, in] of a projection, where it lives and in its dtype (DoRA's norms)."""
    bias: Callable[[str], torch.Tensor | None]


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
    dora_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> g [out] (DoRA)
    ia3_in: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> [in] (feed-forward IA3)
    ia3_out: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> [out]
    prompt_embeddings: torch.Tensor | None = None  # [P, hidden] (prompt tuning, P-tuning)
    prefix_kv: torch.Tensor | None = None  # [layers, 2, kv_heads, P, head_dim] (prefix tuning)

    @property
    def kind(self) -> AdapterKind:
        """How the server applies it."""
        if self.prefix_kv is not None:
            return AdapterKind.PREFIX
        if self.prompt_embeddings is not None:
            return AdapterKind.PROMPT
        if self.ia3_in or self.ia3_out:
            return AdapterKind.IA3
        return AdapterKind.DORA if self.dora_scale else AdapterKind.LORA

    @property
    def num_virtual_tokens(self) -> int:
        if self.prefix_kv is not None:
            return self.prefix_kv.shape[3]
        return 0 if self.prompt_embeddings is None else self.prompt_embeddings.shape[0]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.lora.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        paths = {*self.lora, *self.ia3_in, *self.ia3_out}
        return sorted({path.rsplit(".", 1)[-1] for path in paths})

    def tensors(self) -> list[torch.Tensor]:
        out = [t for m in self.lora.values() for t in (m.a, m.b)]
        out += [*self.dora_scale.values(), *self.ia3_in.values(), *self.ia3_out.values()]
        out += [t for t in (self.prompt_embeddings, self.prefix_kv) if t is not None]
        return out

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def read_config(source: Path) -> dict:
    path = source / CONFIG_FILE
    if not source.is_dir():
        raise NotFound(f"adapter source {source} is not a directory")
    if not path.is_file():
        raise FailedPrecondition(f"{source} has no {CONFIG_FILE}: not a PEFT adapter directory")
    return parse_config(path)


# Safetensors files up to this size are read whole and parsed at once, cheaper for small adapters than
# load_file's memory map tensor by tensor; larger ones keep the map (no transient second copy of the file).
READ_WHOLE_BYTES = 64 << 20


def read_tensors(source: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_path, pickle_path = source / SAFETENSORS_FILE, source / PICKLE_FILE
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load, load_file

        try:
            if safetensors_path.stat().st_size <= READ_WHOLE_BYTES:
                return load(safetensors_path.read_bytes())
            return load_file(str(safetensors_path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise FailedPrecondition(f"{safetensors_path} cannot be read: {error}") from None
    if pickle_path.is_file():
        if not allow_pickle:
            raise FailedPrecondition(
                f"{source} holds only a pickled {PICKLE_FILE}; pickles can run code when loaded, so they are "
                f"refused (convert it to {SAFETENSORS_FILE}, or start the server with pickles allowed)"
            )
        try:
            return torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as error:  # a malformed pickle fails in many ways, none of them a server bug
            raise FailedPrecondition(f"{pickle_path} cannot be read: {error}") from None
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


def _group_by_module(source: Path, tensors: dict[str, torch.Tensor], pattern: str,
                     base: BaseModelSpec) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {name: tensor}} for keys `base_model.model.<path>.<name>` matching `pattern`.

    Every path must be a servable projection, and any other key is refused: the server would
    otherwise silently ignore part of the adapter.
    """
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in sorted(tensors.items()):
        match = re.fullmatch(rf"(.+)\.({pattern})", key.removeprefix(KEY_PREFIX))
        if match is None:
            unknown.append(key)
        else:
            grouped.setdefault(match.group(1), {})[match.group(2)] = tensor
    for path in grouped:
        _check_target(source, path, base)
    if unknown:
        raise FailedPrecondition(
            f"adapter {source} holds tensor {unknown[0]!r}, which loraplex cannot serve (embedding LoRA, "
            "fully saved modules and biases are not served)"
        )
    if not grouped:
        raise FailedPrecondition(f"adapter {source} holds no adapter weights")
    return grouped


def _check_target(source: Path, path: str, base: BaseModelSpec) -> tuple[int, int]:
    if path not in base.targets:
        raise FailedPrecondition(
            f"adapter {source} targets {path}, which is not a linear projection of this base model's "
            "decoder layers (was it trained for another model?)"
        )
    return base.targets[path]


def _check_lora_pair(source: Path, path: str, a: torch.Tensor, b: torch.Tensor, base: BaseModelSpec,
                     max_rank: int) -> None:
    in_features, out_features = _check_target(source, path, base)
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
        raise FailedPrecondition(
            f"adapter {source}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base "
            f"module maps {in_features} -> {out_features} features (expected [r, {in_features}] and "
            f"[{out_features}, r]); the adapter was made for another model"
        )
    if rank > max_rank:
        raise FailedPrecondition(f"adapter {source}: {path} has rank {rank}, above the server's max_rank {max_rank}")


def load_lora(source: Path, config: dict, tensors: dict[str, torch.Tensor], base: BaseModelSpec,
              max_rank: int) -> AdapterWeights:
    """LoRA, QLoRA, rsLoRA with rank/alpha patterns, and DoRA."""
    _check_lora_options(config, source)
    use_dora = bool(config.get("use_dora"))
    names = r"lora_A\.weight|lora_B\.weight" + (r"|lora_magnitude_vector" if use_dora else "")
    adapter = AdapterWeights(peft_type="LORA", source=source, config=config)
    alpha_default = config.get("lora_alpha", 8)
    for path, parts in _group_by_module(source, tensors, names, base).items():
        expected = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if use_dora else set())
        if set(parts) != expected:
            raise FailedPrecondition(
                f"adapter {source}: module {path} has {', '.join(sorted(parts))} but needs {', '.join(sorted(expected))}"
            )
        a, b = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
        _check_lora_pair(source, path, a, b, base, max_rank)
        rank = a.shape[0]
        alpha = pattern_value(config.get("alpha_pattern"), path, alpha_default)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.lora[path] = LoRAModuleWeights(a=a.contiguous(), b=b.contiguous(), scaling=scaling)
        if use_dora:
            magnitude = parts["lora_magnitude_vector"].float()
            if magnitude.shape != (b.shape[0],):
                raise FailedPrecondition(
                    f"adapter {source}: {path} has a DoRA magnitude of shape {tuple(magnitude.shape)}, "
                    f"expected [{b.shape[0]}]"
                )
            # peft: g = m / ||W + s·BA|| per output row, W the (dequantized) base weight
            adapter.dora_scale[path] = (magnitude / dora_norms(base.base_weight(path), a, b, scaling)).contiguous()
    return adapter


# float32 values one step of `dora_norms` holds on the weight's device (32 MiB).
DORA_BLOCK_ELEMENTS = 8 * 2**20


def dora_norms(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·BA‖ of each output row in float32, returned on the host.

    Computed where W lives (the GPU, beside a KV cache that holds most of its memory, from an API
    thread), a block of at most DORA_BLOCK_ELEMENTS float32 values at a time: never a float32 copy
    of the whole weight.
    """
    device = weight.device
    devices.make_current(device)
    a = a.to(device, torch.float32)
    rows = max(1, DORA_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    norms = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows].float() + scaling * (b[start : start + rows].to(device, torch.float32) @ a)
        norms[start : start + rows] = torch.linalg.norm(block, dim=1).cpu()
    return norms


def load_adalora(source: Path, config: dict, tensors: dict[str, torch.Tensor], base: BaseModelSpec,
                 max_rank: int) -> AdapterWeights:
    """AdaLoRA as plain LoRA: A' = E·A, scaling alpha / (init_r + 1e-5); pruned (rank 0) layers dropped.

    peft computes `x @ (A*E).T @ B.T * alpha / (ranknum + 1e-5)` with ranknum the initial rank (kept
    when the rank pattern shrinks a layer); alpha <= 0 means the layer's rank instead.
    """
    _check_lora_options(config, source)
    adapter = AdapterWeights(peft_type="ADALORA", source=source, config=config)
    init_r = config.get("init_r", 12)
    alpha = config.get("lora_alpha", 8)
    for path, parts in _group_by_module(source, tensors, "lora_A|lora_B|lora_E", base).items():
        if set(parts) != {"lora_A", "lora_B", "lora_E"}:
            raise FailedPrecondition(f"adapter {source}: AdaLoRA module {path} lacks one of lora_A, lora_B, lora_E")
        a, b, e = parts["lora_A"].float(), parts["lora_B"].float(), parts["lora_E"].float()
        if a.shape[0] == 0:
            continue
        if e.shape != (a.shape[0], 1):
            raise FailedPrecondition(f"adapter {source}: {path} has lora_E {tuple(e.shape)}, expected [{a.shape[0]}, 1]")
        _check_lora_pair(source, path, a, b, base, max_rank)
        scaling = (alpha if alpha > 0 else a.shape[0]) / (init_r + 1e-5)
        adapter.lora[path] = LoRAModuleWeights(a=(a * e).contiguous(), b=b.contiguous(), scaling=scaling)
    return adapter


def load_ia3(source: Path, config: dict, tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> AdapterWeights:
    """IA3: [1, in] vectors scale a feed-forward module's input, [out, 1] vectors its output."""
    adapter = AdapterWeights(peft_type="IA3", source=source, config=config)
    for path, parts in _group_by_module(source, tensors, "ia3_l", base).items():
        in_features, out_features = _check_target(source, path, base)
        vector = parts["ia3_l"].float()
        if vector.shape == (1, in_features):
            adapter.ia3_in[path] = vector.flatten().contiguous()
        elif vector.shape == (out_features, 1):
            adapter.ia3_out[path] = vector.flatten().contiguous()
        else:
            raise FailedPrecondition(
                f"adapter {source}: {path} has ia3_l {tuple(vector.shape)}, expected [1, {in_features}] "
                f"(feed-forward) or [{out_features}, 1]"
            )
    return adapter


def _prompt_tensor(source: Path, config: dict, tensors: dict[str, torch.Tensor], width: int, what: str) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        raise FailedPrecondition(f"adapter {source} should hold exactly one tensor, prompt_embeddings")
    if config.get("num_transformer_submodules", 1) != 1:
        raise FailedPrecondition(f"adapter {source} is for an encoder-decoder model (num_transformer_submodules > 1)")
    embeddings = tensors["prompt_embeddings"].float()
    count = config.get("num_virtual_tokens")
    if embeddings.dim() != 2 or embeddings.shape != (count, width):
        raise FailedPrecondition(
            f"adapter {source}: prompt_embeddings has shape {tuple(embeddings.shape)}, expected "
            f"[num_virtual_tokens={count}, {width}] ({what}); the adapter was made for another model"
        )
    return embeddings


def load_prompt(source: Path, config: dict, tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> AdapterWeights:
    """Prompt tuning and P-tuning: peft saves the final virtual embeddings (P-tuning's MLP applied)."""
    embeddings = _prompt_tensor(source, config, tensors, base.hidden_size, "the model's hidden size")
    return AdapterWeights(peft_type=str(config["peft_type"]).upper(), source=source, config=config,
                          prompt_embeddings=embeddings.contiguous())


def load_prefix(source: Path, config: dict, tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> AdapterWeights:
    """Prefix tuning: per layer keys and values of P virtual positions (projection already applied on disk).

    peft views the saved [P, layers*2*kv_heads*head_dim] as [P, layers*2, kv_heads, head_dim] and
    gives layer l the keys at index 2l and the values at 2l+1, as [kv_heads, P, head_dim], no RoPE.
    """
    if config.get("num_layers") != base.num_layers or config.get("num_attention_heads") != base.num_kv_heads:
        raise FailedPrecondition(
            f"adapter {source} was made for {config.get('num_layers')} layers and {config.get('num_attention_heads')} "
            f"key/value heads; this model has {base.num_layers} and {base.num_kv_heads}"
        )
    width = base.num_layers * 2 * base.num_kv_heads * base.head_dim
    embeddings = _prompt_tensor(source, config, tensors, width, "layers x 2 x kv_heads x head_dim")
    count = embeddings.shape[0]
    kv = embeddings.view(count, base.num_layers * 2, base.num_kv_heads, base.head_dim).permute(1, 2, 0, 3)
    kv = kv.reshape(base.num_layers, 2, base.num_kv_heads, count, base.head_dim)
    return AdapterWeights(peft_type="PREFIX_TUNING", source=source, config=config, prefix_kv=kv.contiguous())


def load_adapter(source: Path, base: BaseModelSpec, max_rank: int, allow_pickle: bool = False) -> AdapterWeights:
    """Read, validate and convert the adapter at `source` for the base model described by `base`."""
    config = read_config(source)
    peft_type = str(config["peft_type"]).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise FailedPrecondition(
            f"adapter {source} is of type {peft_type}; loraplex serves {', '.join(SUPPORTED_TYPES)}"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise FailedPrecondition(f"adapter {source} has task_type {config.get('task_type')}; only CAUSAL_LM is served")
    tensors = read_tensors(source, allow_pickle)
    if not isinstance(tensors, dict):
        raise FailedPrecondition(f"adapter {source}: the weights file holds no named tensors")
    validate_adapter(source, config, tensors, base)
    if config.get("modules_to_save"):
        raise FailedPrecondition(f"adapter {source} uses {_UNSUPPORTED_LORA_OPTIONS['modules_to_save']}, "
                                 "which loraplex does not serve")
    if peft_type == "LORA":
        adapter = load_lora(source, config, tensors, base, max_rank)
    elif peft_type == "ADALORA":
        adapter = load_adalora(source, config, tensors, base, max_rank)
    elif peft_type == "IA3":
        adapter = load_ia3(source, config, tensors, base)
    elif peft_type == "PREFIX_TUNING":
        adapter = load_prefix(source, config, tensors, base)
    else:
        adapter = load_prompt(source, config, tensors, base)
    if not (adapter.lora or adapter.ia3_in or adapter.ia3_out or adapter.kind in (AdapterKind.PROMPT, AdapterKind.PREFIX)):
        raise FailedPrecondition(f"adapter {source} has no weights left to serve (every layer was pruned)")
    return adapter
