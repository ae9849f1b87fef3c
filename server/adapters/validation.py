"""Check a PEFT adapter against peft's own rules before the loader converts it.

`parse_config` reads `adapter_config.json` with bounds (size, nesting); `validate_adapter` checks every
config field the loader uses (type and range) and every tensor (dtype, finiteness, shape) against the
config and the base model. Whatever peft itself would refuse to load, or would load differently, is
refused with `FailedPrecondition` naming the field or tensor:

- `r`, `init_r`, `target_r`, `rank_pattern` values, `num_virtual_tokens`: positive integers;
  `lora_alpha` and `alpha_pattern` values: finite numbers; `lora_dropout`: in [0, 1];
  pattern keys and string `target_modules` / `exclude_modules` / `feedforward_modules`: valid regexes;
  `layers_to_transform`: layer indices of this base model.
- `target_modules` must match at least one projection of the base model (peft: "Target modules ...
  not found in the base model"), and every tensor must belong to a module that peft would adapt
  (`target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`): peft ignores the
  others, so serving them would differ from peft.
- LoRA tensors have the rank peft builds for the module (`rank_pattern`, else `r`); IA3 vectors have
  the orientation `feedforward_modules` gives the module.
- Weights are floating point (float16, bfloat16, float32, float64) and finite: a NaN or infinite weight
  would spread to every token of the request, so such adapters are refused rather than served.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraplex.server.errors import FailedPrecondition

if TYPE_CHECKING:
    from loraplex.server.adapters.loader import BaseModelSpec

MAX_CONFIG_BYTES = 1 << 20
"""A peft config is a few kB; anything larger is not one."""
MAX_CONFIG_DEPTH = 16
"""peft configs nest 3 levels at most (a dict of lists); deeper documents are refused."""
MAX_PATTERN_LENGTH = 1024
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# the regexes peft builds around rank/alpha pattern keys and layers_pattern entries
_PATTERN_KEY = r"(.*\.)?({})$"
_LAYER_INDEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
# tensor name -> number of dimensions, per adapter type
_TENSOR_DIMS = {
    "LORA": {"lora_A.weight": 2, "lora_B.weight": 2, "lora_magnitude_vector": 1},
    "ADALORA": {"lora_A": 2, "lora_B": 2, "lora_E": 2},
    "IA3": {"ia3_l": 2},
}


def parse_config(path: Path) -> dict:
    """The JSON object in `path`, read with a size cap and a nesting bound."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)  # never more, however large the file is
        if len(data) > MAX_CONFIG_BYTES:
            raise FailedPrecondition(f"{path} is larger than {MAX_CONFIG_BYTES} bytes, the most a PEFT adapter "
                                     "config is allowed")
        config = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise FailedPrecondition(f"{path} is nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:  # ValueError: JSON syntax, int too long
        raise FailedPrecondition(f"{path} is not valid JSON: {error}") from None
    if _depth(config) > MAX_CONFIG_DEPTH:
        raise FailedPrecondition(f"{path} is nested deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(config, dict) or "peft_type" not in config:
        raise FailedPrecondition(f"{path} has no peft_type")
    if not isinstance(config["peft_type"], str):
        raise FailedPrecondition(f"{path}: peft_type is {config['peft_type']!r}, not a string")
    return config


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_CONFIG_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate_adapter(source: Path, config: dict, tensors: dict, base: "BaseModelSpec") -> None:
    """Refuse (FailedPrecondition) an adapter peft would refuse or load differently; see the module doc."""
    peft_type = config["peft_type"].upper()
    fields = _Fields(source, config)
    _check_tensors(source, tensors)
    if peft_type in ("LORA", "ADALORA", "IA3"):
        _check_module_adapter(source, peft_type, fields, tensors, base)
    else:
        fields.positive_int("num_virtual_tokens", required=True)
        for name in ("num_transformer_submodules", "token_dim", "num_layers", "num_attention_heads"):
            fields.positive_int(name)


def _check_tensors(source: Path, tensors: dict) -> None:
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise FailedPrecondition(f"adapter {source}: entry {key!r} of the weights file is not a named tensor")
        if tensor.dtype not in WEIGHT_DTYPES:
            raise FailedPrecondition(f"adapter {source}: tensor {key} has dtype {tensor.dtype}; adapter weights "
                                     "are float16, bfloat16, float32 or float64")
        if not bool(torch.isfinite(tensor).all()):
            raise FailedPrecondition(f"adapter {source}: tensor {key} holds NaN or infinite values")


def _check_module_adapter(source: Path, peft_type: str, fields: "_Fields", tensors: dict,
                          base: "BaseModelSpec") -> None:
    """LoRA, AdaLoRA and IA3: which modules peft adapts, and each tensor's rank and orientation."""
    targets = fields.modules("target_modules")
    exclude = fields.modules("exclude_modules")
    layers = fields.layer_indices("layers_to_transform", base.num_layers)
    patterns = fields.modules("layers_pattern", embedded_in=_LAYER_INDEX)
    if isinstance(patterns, str):
        patterns = [patterns]
    rule = _TargetRule(targets, exclude, layers, patterns or [])
    feedforward = None
    if peft_type == "LORA":
        rank = fields.positive_int("r", default=8, allow_none=False)
        fields.number("lora_alpha")
        ranks = fields.pattern("rank_pattern", positive_int=True)
        fields.pattern("alpha_pattern", positive_int=False)
        for name in ("use_rslora", "use_dora"):
            fields.boolean(name)
    elif peft_type == "ADALORA":
        rank = fields.positive_int("init_r", default=12, allow_none=False)
        fields.positive_int("target_r")
        fields.number("lora_alpha")
        ranks = {}
    else:
        rank, ranks = None, {}
        feedforward = fields.modules("feedforward_modules")
    fields.fraction("lora_dropout")
    dims = _TENSOR_DIMS[peft_type]
    modules = {key: _split_key(key) for key in sorted(tensors)}
    modules = {key: (path, name) for key, (path, name) in modules.items() if name in dims}
    # tensors of modules the base lacks are refused by the loader, naming the module
    servable = all(path in base.targets for path, _ in modules.values())
    if servable and targets is not None and not any(rule.adapts(path) for path in base.targets):
        raise FailedPrecondition(
            f"adapter {source}: target_modules {targets!r} not found in the base model (none of its "
            "decoder-layer projections matches; was it trained for another model?)"
        )
    for key, (path, name) in modules.items():
        tensor = tensors[key]
        if path not in base.targets:
            continue
        if tensor.dim() != dims[name]:
            raise FailedPrecondition(f"adapter {source}: tensor {key} has shape {tuple(tensor.shape)}, "
                                     f"expected {dims[name]} dimensions")
        if not rule.adapts(path):
            raise FailedPrecondition(
                f"adapter {source} holds weights for {path}, which its target_modules, exclude_modules, "
                "layers_to_transform and layers_pattern leave out (peft would not load them)"
            )
        if peft_type == "LORA" and name == "lora_A.weight":
            expected = _pattern_value(ranks, path, rank)
            if tensor.shape[0] != expected:
                raise FailedPrecondition(
                    f"adapter {source}: {path} has lora_A of rank {tensor.shape[0]}, but its config gives rank "
                    f"{expected} (r / rank_pattern)"
                )
        elif peft_type == "ADALORA" and name == "lora_A" and tensor.shape[0] > rank:
            raise FailedPrecondition(f"adapter {source}: {path} has lora_A of rank {tensor.shape[0]}, above "
                                     f"init_r {rank}")
        elif peft_type == "IA3":
            in_features, out_features = base.targets[path]
            expected = (1, in_features) if _is_feedforward(feedforward, path) else (out_features, 1)
            if tuple(tensor.shape) != expected:
                raise FailedPrecondition(
                    f"adapter {source}: {path} has ia3_l {tuple(tensor.shape)}, but feedforward_modules makes it "
                    f"{list(expected)}"
                )


def _split_key(key: str) -> tuple[str, str]:
    """(module path, tensor name) of `base_model.model.<path>.<name>`."""
    path, _, name = key.removeprefix(KEY_PREFIX).rpartition(".")
    if name == "weight" and path.endswith((".lora_A", ".lora_B")):
        path, _, prefix = path.rpartition(".")
        name = f"{prefix}.weight"
    return path, name


class _TargetRule:
    """peft's `check_target_module_exists` for module paths of the base model."""

    def __init__(self, targets, exclude, layers, patterns: list[str]):
        self.targets, self.exclude, self.layers, self.patterns = targets, exclude, layers, patterns

    def adapts(self, path: str) -> bool:
        if self.exclude is not None and _names(self.exclude, path, suffix_dot=True):
            return False
        if self.targets is None or self.targets == ALL_LINEAR:
            return True
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, path) is not None
        if path in self.targets:
            return True
        if not any(path.endswith(f".{target}") for target in self.targets):
            return False
        if self.layers is None:
            return True
        if self.patterns:
            match = next((m for p in self.patterns if (m := re.match(_LAYER_INDEX.format(p), path))), None)
        else:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        return match is not None and int(match.group("idx")) in self.layers


def _names(modules, path: str, suffix_dot: bool) -> bool:
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return path in modules or any(path.endswith(f".{m}" if suffix_dot else m) for m in modules)


def _is_feedforward(feedforward, path: str) -> bool:
    """peft IA3: a regex string matches the whole path, list entries match its end."""
    return feedforward is not None and _names(feedforward, path, suffix_dot=False)


def _pattern_value(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.match(_PATTERN_KEY.format(key), path):
            return value
    return default


class _Fields:
    """Typed access to config fields; each refusal names the field and its value."""

    def __init__(self, source: Path, config: dict):
        self.source, self.config = source, config

    def _refuse(self, name: str, what: str) -> FailedPrecondition:
        value = repr(self.config.get(name))
        value = value if len(value) <= 80 else value[:77] + "..."
        return FailedPrecondition(f"adapter {self.source}: {name} is {value}, but it must be {what}")

    def boolean(self, name: str) -> None:
        if not isinstance(self.config.get(name) or False, bool):
            raise self._refuse(name, "true or false")

    def positive_int(self, name: str, default=None, required: bool = False, allow_none: bool = True):
        if name not in self.config and not required:
            return default
        value = self.config.get(name)
        if value is None and allow_none and not required:
            return default
        if not _is_int(value) or value <= 0:
            raise self._refuse(name, "a positive integer")
        return value

    def number(self, name: str) -> None:
        if name in self.config and not _is_finite_number(self.config[name]):
            raise self._refuse(name, "a finite number")

    def fraction(self, name: str) -> None:
        value = self.config.get(name, 0.0)
        if not _is_finite_number(value) or not 0 <= value <= 1:
            raise self._refuse(name, "a number in [0, 1]")

    def modules(self, name: str, embedded_in: str | None = None):
        """None, a regex string, or a list of module names (regexes too when peft embeds them in one)."""
        value = self.config.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            _check_regex(self, name, value, embedded_in or "{}")
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._refuse(name, "a regex string or a list of module names")
        for v in value:
            if embedded_in is not None:
                _check_regex(self, name, v, embedded_in)
        return value

    def layer_indices(self, name: str, num_layers: int) -> set[int] | None:
        value = self.config.get(name)
        if value is None or value == []:
            return None
        values = [value] if _is_int(value) else value
        if not isinstance(values, list) or not all(_is_int(v) and 0 <= v < num_layers for v in values):
            raise self._refuse(name, f"a layer index or a list of layer indices in [0, {num_layers})")
        return set(values)

    def pattern(self, name: str, positive_int: bool) -> dict:
        value = self.config.get(name) or {}
        if not isinstance(value, dict):
            raise self._refuse(name, "an object of module patterns")
        for key, item in value.items():
            _check_regex(self, name, key, _PATTERN_KEY)
            ok = (_is_int(item) and item > 0) if positive_int else _is_finite_number(item)
            if not ok:
                what = "positive integers" if positive_int else "finite numbers"
                raise FailedPrecondition(f"adapter {self.source}: {name}[{key!r}] is {item!r}; values of {name} "
                                         f"must be {what}")
        return value


def _check_regex(fields: _Fields, name: str, pattern: str, template: str) -> None:
    """`pattern` compiles inside the regex peft builds from it (`template`)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise FailedPrecondition(f"adapter {fields.source}: {name} holds a pattern of {len(pattern)} characters "
                                 f"(at most {MAX_PATTERN_LENGTH})")
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError) as error:
        raise FailedPrecondition(f"adapter {fields.source}: {name} holds {pattern!r}, not a valid regex: "
                                 f"{error}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
