"""`TrainConfig`: everything one `loraplex train` run needs, validated once.

Fields left at None take the method's default (see `DEFAULTS`), so that the check "does this option
fit the method" can tell an option the user gave from one they did not. Messages name the CLI
flags, since the CLI is how most people reach this; the Python API uses the same names with
underscores.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.errors import UserError

METHODS = ("lora", "qlora", "dora", "adalora", "ia3", "prefix", "prompt", "p-tuning")
LORA_FAMILY = frozenset({"lora", "qlora", "dora", "adalora"})
PROMPT_LEARNING = frozenset({"prefix", "prompt", "p-tuning"})

# AdamW learning rates within the ranges the methods' papers and peft's examples use, picked at the
# upper end so that a few hundred steps visibly change the small demo model (measured on it: 60
# steps of pirate.jsonl). Prompt-learning methods train few parameters far from the weights and
# need larger steps than LoRA.
DEFAULT_LR = {
    "lora": 1e-3,
    "qlora": 1e-3,
    "dora": 1e-3,
    "adalora": 5e-3,
    "ia3": 3e-2,
    "prefix": 3e-2,
    "prompt": 1e-1,
    "p-tuning": 1e-3,
}
DEFAULT_RANK = 8
DEFAULT_DROPOUT = 0.05
DEFAULT_ADALORA_INIT_R = 12
DEFAULT_ADALORA_TARGET_R = 8
DEFAULT_NUM_VIRTUAL_TOKENS = 20
DEFAULT_EPOCHS = 3

# option (field name) -> (CLI flag, methods it applies to, why it does not apply elsewhere)
_APPLIES = {
    "rank": ("--rank", {"lora", "qlora", "dora"}, "it sets the LoRA rank"),
    "alpha": ("--alpha", LORA_FAMILY, "it scales LoRA updates"),
    "rslora": ("--rslora", {"lora", "qlora", "dora"}, "it changes the LoRA scaling to alpha/sqrt(rank)"),
    "dropout": ("--dropout", LORA_FAMILY, "it is the dropout on the LoRA input"),
    "target_modules": ("--target-modules", LORA_FAMILY | {"ia3"}, "prompt-learning methods adapt no layers"),
    "feedforward_modules": ("--feedforward-modules", {"ia3"}, "it is IA3's choice of input-scaled layers"),
    "adalora_init_r": ("--adalora-init-r", {"adalora"}, "it is AdaLoRA's starting rank"),
    "adalora_target_r": ("--adalora-target-r", {"adalora"}, "it is AdaLoRA's target rank"),
    "num_virtual_tokens": ("--num-virtual-tokens", PROMPT_LEARNING, "only prompt-learning methods add virtual tokens"),
    "prefix_projection": ("--prefix-projection", {"prefix"}, "it reparametrises the prefix-tuning prefix"),
}
_HINT = {
    ("rank", "adalora"): "; use --adalora-init-r and --adalora-target-r",
    ("rslora", "adalora"): "; AdaLoRA scales by alpha over its current rank",
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run: base model, method and its options, data, loop settings, output."""

    model: Path
    """Base model directory, as written by `save_pretrained` (config, weights and tokenizer)."""
    method: str
    """Adapter type: one of `METHODS`."""
    data: Path
    """Training data, JSON Lines of {"prompt", "completion"} or {"text"} objects."""
    out: Path
    """Directory for adapter_config.json, adapter_model.safetensors and training_summary.json."""
    eval_data: Path | None = None
    """Held-out data in the training format; its loss is reported before and after training."""
    rank: int | None = None
    """LoRA rank r (lora, qlora, dora); default 8."""
    alpha: float | None = None
    """LoRA alpha (LoRA family); default twice the rank (twice the target rank for AdaLoRA)."""
    rslora: bool = False
    """Scale LoRA updates by alpha/sqrt(r) instead of alpha/r (lora, qlora, dora)."""
    dropout: float | None = None
    """Dropout on the LoRA input (LoRA family); default 0.05."""
    target_modules: tuple[str, ...] | None = None
    """Layer names to adapt (LoRA family, IA3); default every linear layer in the decoder layers."""
    feedforward_modules: tuple[str, ...] | None = None
    """IA3 layers whose input (not output) is scaled; default the MLP down projections."""
    adalora_init_r: int | None = None
    """AdaLoRA's rank before pruning; default 12."""
    adalora_target_r: int | None = None
    """AdaLoRA's average rank after pruning; default 8."""
    num_virtual_tokens: int | None = None
    """Virtual tokens for prefix, prompt and P-tuning; default 20."""
    prefix_projection: bool = False
    """Prefix tuning: learn the prefix through an MLP (saved already projected)."""
    epochs: int | None = None
    """Passes over the data; default 3 unless `max_steps` is given."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (with `epochs`, whichever comes first)."""
    lr: float | None = None
    """AdamW learning rate; default per method (`DEFAULT_LR`)."""
    batch_size: int = 8
    """Examples per optimizer step."""
    max_length: int = 512
    """Tokens per example (prompt + completion + EOS); longer completions are cut."""
    seed: int = 0
    """Seed for adapter initialisation, dropout and data order."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" (the current CUDA device) or "cuda:N"."""
    overwrite: bool = False
    """Replace the adapter files in a non-empty `out`."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self) -> None:
        for name in ("model", "data", "out", "eval_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = split_names(value)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self._check_fits_method()
        self._check_values()

    def _check_fits_method(self) -> None:
        for name, (flag, methods, why) in _APPLIES.items():
            value = getattr(self, name)
            given = value is not None and value is not False
            if given and self.method not in methods:
                hint = _HINT.get((name, self.method), "")
                raise UserError(
                    f"{flag} does not apply to --method {self.method} ({why}; it applies to "
                    f"{', '.join(m for m in METHODS if m in methods)}){hint}"
                )

    def _check_values(self) -> None:
        for name in ("rank", "adalora_init_r", "adalora_target_r", "num_virtual_tokens", "epochs",
                     "max_steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UserError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise UserError(f"{_flag(name)} must be a positive number, got {value!r}")
        if self.dropout is not None and not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise UserError(f"--dropout must be at least 0 and below 1, got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.max_length < 2:
            raise UserError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.adalora_target_rank > self.adalora_init_rank:
            raise UserError(
                f"--adalora-target-r ({self.adalora_target_rank}) must not exceed "
                f"--adalora-init-r ({self.adalora_init_rank})"
            )
        for name in ("target_modules", "feedforward_modules"):
            names = getattr(self, name)
            if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
                raise UserError(f"{_flag(name)} needs at least one layer name, e.g. q_proj,v_proj")
        if self.feedforward_modules is not None and self.target_modules is not None:
            extra = [n for n in self.feedforward_modules if n not in self.target_modules]
            if extra:
                raise UserError(
                    f"--feedforward-modules {','.join(extra)} must also be in --target-modules"
                )

    # Effective values: the user's choice or the method's default.

    @property
    def lora_rank(self) -> int:
        return self.rank if self.rank is not None else DEFAULT_RANK

    @property
    def adalora_init_rank(self) -> int:
        return self.adalora_init_r if self.adalora_init_r is not None else DEFAULT_ADALORA_INIT_R

    @property
    def adalora_target_rank(self) -> int:
        if self.adalora_target_r is not None:
            return self.adalora_target_r
        return min(DEFAULT_ADALORA_TARGET_R, self.adalora_init_rank)

    @property
    def lora_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        rank = self.adalora_target_rank if self.method == "adalora" else self.lora_rank
        return 2 * rank

    @property
    def lora_dropout(self) -> float:
        return self.dropout if self.dropout is not None else DEFAULT_DROPOUT

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens if self.num_virtual_tokens is not None else DEFAULT_NUM_VIRTUAL_TOKENS

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: epochs x steps per epoch, capped by max_steps."""
        if self.epochs is None and self.max_steps is not None:
            return self.max_steps
        steps = (self.epochs or DEFAULT_EPOCHS) * steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps is not None else steps


def split_names(text: str) -> tuple[str, ...]:
    """"q_proj, v_proj" -> ("q_proj", "v_proj"); empty items are dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
