"""Method name -> peft config, one small function per method, plus target-layer detection.

Default targets for the LoRA family and IA3 are every linear layer inside the decoder layers (for
Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), found in the loaded model
rather than from a per-architecture table, so any decoder that transformers loads works. bitsandbytes'
Linear4bit and Linear8bitLt subclass nn.Linear and are found too.
"""

from __future__ import annotations

from typing import Any

from loraplex.server.errors import UserError
from loraplex.server.train.config import TrainConfig

TASK_TYPE = "CAUSAL_LM"
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def peft_config(config: TrainConfig, model: Any, total_steps: int) -> Any:
    """The peft config for `config.method` on `model`; `total_steps` is AdaLoRA's schedule length."""
    build = {
        "lora": _lora,
        "qlora": _lora,  # the same adapter; the 4-bit base is the difference
        "dora": _dora,
        "adalora": _adalora,
        "ia3": _ia3,
        "prefix": _prefix,
        "prompt": _prompt,
        "p-tuning": _p_tuning,
    }[config.method]
    return build(config, model, total_steps)


def _lora(config: TrainConfig, model: Any, total_steps: int, **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type=TASK_TYPE,
        r=config.lora_rank,
        lora_alpha=_int_if_whole(config.lora_alpha),
        lora_dropout=config.lora_dropout,
        use_rslora=config.rslora,
        target_modules=target_modules(config, model),
        **extra,
    )


def _dora(config: TrainConfig, model: Any, total_steps: int) -> Any:
    return _lora(config, model, total_steps, use_dora=True)


def _adalora(config: TrainConfig, model: Any, total_steps: int) -> Any:
    from peft import AdaLoraConfig

    # Rank budget: full for the first tenth of training, cut down (cubic schedule) until the last
    # fifth, then fixed; peft needs tinit < total_step - tfinal, which these satisfy for any total.
    return AdaLoraConfig(
        task_type=TASK_TYPE,
        init_r=config.adalora_init_rank,
        target_r=config.adalora_target_rank,
        lora_alpha=_int_if_whole(config.lora_alpha),
        lora_dropout=config.lora_dropout,
        target_modules=target_modules(config, model),
        total_step=total_steps,
        tinit=total_steps // 10,
        tfinal=total_steps // 5,
        deltaT=1,
    )


def _ia3(config: TrainConfig, model: Any, total_steps: int) -> Any:
    from peft import IA3Config

    targets = target_modules(config, model)
    if config.feedforward_modules is not None:
        feedforward = list(config.feedforward_modules)
        outside = [name for name in feedforward if name not in targets]
        if outside:  # peft requires feedforward_modules to be a subset of target_modules
            raise UserError(
                f"--feedforward-modules {','.join(outside)} must be among the adapted layers "
                f"({', '.join(targets)}); add it to --target-modules"
            )
    else:
        feedforward = [name for name in mlp_down_projections(model) if name in targets]
    return IA3Config(task_type=TASK_TYPE, target_modules=targets, feedforward_modules=feedforward)


def _prefix(config: TrainConfig, model: Any, total_steps: int) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=TASK_TYPE,
        num_virtual_tokens=config.virtual_tokens,
        prefix_projection=config.prefix_projection,
    )


def _prompt(config: TrainConfig, model: Any, total_steps: int) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    return PromptTuningConfig(
        task_type=TASK_TYPE,
        num_virtual_tokens=config.virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


def _p_tuning(config: TrainConfig, model: Any, total_steps: int) -> Any:
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

    return PromptEncoderConfig(
        task_type=TASK_TYPE,
        num_virtual_tokens=config.virtual_tokens,
        encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
    )


def target_modules(config: TrainConfig, model: Any) -> list[str]:
    """The user's --target-modules, checked against the model, or every decoder linear layer."""
    if config.target_modules is not None:
        _check_names(model, config.target_modules, "--target-modules")
        return list(config.target_modules)
    return decoder_linear_names(model)


def decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """(path, module) of each decoder layer: the ModuleList as long as the model has layers."""
    import torch

    text_config = model.config.get_text_config()
    count = getattr(text_config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and count is not None and len(module) == count:
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise UserError(
        f"cannot find the decoder layers of this {type(model).__name__}; name the layers to adapt "
        "with --target-modules"
    )


def decoder_linear_names(model: Any) -> list[str]:
    """Leaf names of the linear layers inside the decoder layers, in first-seen order."""
    import torch

    names: dict[str, None] = {}
    for _, layer in decoder_layers(model):
        for path, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                names[path.rsplit(".", 1)[-1]] = None
    if not names:
        raise UserError("the model's decoder layers have no linear layers to adapt")
    return list(names)


def mlp_down_projections(model: Any) -> list[str]:
    """Leaf names of the MLP layers that project back to the hidden size (Llama's down_proj)."""
    import torch

    hidden = model.config.get_text_config().hidden_size
    names: dict[str, None] = {}
    for _, layer in decoder_layers(model):
        for path, module in layer.named_modules():
            parts = path.split(".")
            if (
                isinstance(module, torch.nn.Linear)
                and any(part in _MLP_NAMES for part in parts[:-1])
                and module.out_features == hidden
                and module.in_features != hidden
            ):
                names[parts[-1]] = None
    return list(names)


def _check_names(model: Any, names: tuple[str, ...], flag: str) -> None:
    """Each name must be a linear layer's name or path suffix, as peft matches them."""
    import torch

    linear_paths = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in names:
        if not any(p == name or p.endswith("." + name) for p in linear_paths):
            raise UserError(
                f"{flag}: the model has no linear layer named {name!r} (its decoder layers have: "
                f"{', '.join(decoder_linear_names(model))})"
            )


def _int_if_whole(value: float) -> float | int:
    """adapter_config.json conventionally stores lora_alpha as an integer."""
    return int(value) if float(value).is_integer() else value
