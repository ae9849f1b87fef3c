"""The training run: check inputs, load, wrap with peft, a plain AdamW loop, save, summarise.

One step reads as: forward (with labels, so that methods with their own loss terms, AdaLoRA's
orthogonality penalty, apply) -> backward -> clip -> optimizer step -> AdaLoRA rank update ->
zero_grad. The loss shown and summarised is the language-model loss on the labelled tokens alone,
computed from the logits, so it means the same for every method.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraplex.server.errors import UserError
from loraplex.server.model.quantization import bnb_config, keep_bnb_off_packed_cpu_path
from loraplex.server.train import data, methods
from loraplex.server.train.config import TrainConfig
from loraplex.server.train.progress import Progress

SUMMARY_FILE = "training_summary.json"
MAX_GRAD_NORM = 1.0
# Files this command writes into --out, or that a previous adapter there may have left.
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", SUMMARY_FILE)


@dataclass(frozen=True)
class TrainSummary:
    """What a run did; written as training_summary.json beside the adapter."""

    method: str
    base_model: str
    adapter: str
    device: str
    dtype: str  # of the base weights; "nf4" for qlora
    examples: int
    eval_examples: int | None
    batch_size: int
    lr: float
    steps: int
    epochs: float  # steps / steps per epoch
    train_loss_first: float  # loss of the first step's batch
    train_loss_last: float  # mean loss over the last epoch's worth of steps
    eval_loss_initial: float | None  # eval loss before training
    eval_loss: float | None  # eval loss after training
    trainable_params: int
    total_params: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(config: TrainConfig) -> TrainSummary:
    """Train one adapter as `config` says, save it to `config.out`, return the summary."""
    with _without_library_noise():
        return _train(config)


def _train(config: TrainConfig) -> TrainSummary:
    started = time.perf_counter()
    _check_paths(config)
    train_examples = data.load_examples(config.data)
    eval_examples = data.load_examples(config.eval_data) if config.eval_data is not None else None

    import torch

    device = _pick_device(config.device)
    tokenizer = _load_tokenizer(config.model)
    train_set = data.encode(train_examples, tokenizer, config.max_length)
    eval_set = data.encode(eval_examples, tokenizer, config.max_length) if eval_examples else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model, dtype_name = _load_model(config, device)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.total_steps(steps_per_epoch)

    from peft import get_peft_model

    torch.manual_seed(config.seed)  # adapter initialisation and dropout
    model = get_peft_model(model, methods.peft_config(config, model, total_steps))
    if config.method != "qlora":  # the 4-bit base was placed on its device while loading
        model.to(device)
    trainable, total = model.get_nb_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)

    eval_initial = evaluate_loss(model, eval_set, config.batch_size, pad_id, device) if eval_set else None
    order_rng = torch.Generator().manual_seed(config.seed)
    progress = Progress(total_steps, enabled=not config.quiet)
    losses: list[float] = []
    step = epoch = 0
    model.train()
    while step < total_steps:
        epoch += 1
        order = torch.randperm(len(train_set), generator=order_rng).tolist()
        for batch in data.batches(train_set, config.batch_size, order):
            inputs = data.collate(batch, pad_id, device)
            outputs = model(**inputs, use_cache=False)
            outputs.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            step += 1
            if config.method == "adalora":  # needs this step's gradients: before zero_grad
                model.base_model.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            loss = _lm_loss(outputs.logits.detach(), inputs["labels"])[0].item()
            if not math.isfinite(loss):
                progress.close()
                raise UserError(f"training diverged: the loss is {loss} at step {step}; try a lower --lr")
            losses.append(loss)
            progress.update(step, epoch, loss)
            if step == total_steps:
                break
    progress.close()
    eval_final = evaluate_loss(model, eval_set, config.batch_size, pad_id, device) if eval_set else None

    _save(model, config.out)
    last_epoch = losses[-min(steps_per_epoch, len(losses)) :]
    summary = TrainSummary(
        method=config.method,
        base_model=str(config.model),
        adapter=str(config.out),
        device=str(device),
        dtype=dtype_name,
        examples=len(train_set),
        eval_examples=len(eval_set) if eval_set else None,
        batch_size=config.batch_size,
        lr=config.learning_rate,
        steps=step,
        epochs=round(step / steps_per_epoch, 3),
        train_loss_first=losses[0],
        train_loss_last=sum(last_epoch) / len(last_epoch),
        eval_loss_initial=eval_initial,
        eval_loss=eval_final,
        trainable_params=trainable,
        total_params=total,
        seconds=round(time.perf_counter() - started, 2),
    )
    (config.out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def format_summary(summary: TrainSummary) -> str:
    """The summary as a few lines for a terminal."""
    lines = [
        f"trained {summary.method} adapter -> {summary.adapter}",
        f"  steps       {summary.steps} ({summary.epochs:g} epochs of {summary.examples} examples, "
        f"batch size {summary.batch_size}, lr {summary.lr:g})",
        f"  train loss  {summary.train_loss_first:.4f} (first step) -> {summary.train_loss_last:.4f} (last epoch)",
    ]
    if summary.eval_loss is not None:
        lines.append(
            f"  eval loss   {summary.eval_loss_initial:.4f} -> {summary.eval_loss:.4f} "
            f"({summary.eval_examples} examples)"
        )
    share = 100 * summary.trainable_params / max(summary.total_params, 1)
    lines += [
        f"  parameters  {summary.trainable_params:,} trainable of {summary.total_params:,} ({share:.2f}%)",
        f"  device      {summary.device} ({summary.dtype}), {summary.seconds:.1f} s",
        f"  summary     {Path(summary.adapter) / SUMMARY_FILE}",
    ]
    return "\n".join(lines)


def _check_paths(config: TrainConfig) -> None:
    """Every path problem, before anything slow is loaded."""
    model = config.model
    if not model.exists():
        raise UserError(f"model directory not found: {model}")
    if not model.is_dir():
        raise UserError(f"--model must be a directory (as written by save_pretrained): {model}")
    if not (model / "config.json").is_file():
        raise UserError(f"{model} is not a model directory: it has no config.json")
    for flag, path in (("--data", config.data), ("--eval-data", config.eval_data)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} file not found: {path}")
        if path is not None and not path.is_file():
            raise UserError(f"{flag} is not a file: {path}")
    out = config.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out exists and is not a directory: {out}")
    if out.exists() and out.resolve() == model.resolve():
        raise UserError("--out is the model directory; write the adapter to a directory of its own")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise UserError(
            f"output directory {out} exists and is not empty; pass --overwrite to replace the adapter in it"
        )


def _pick_device(choice: str) -> Any:
    import torch

    from loraplex.kernels.devices import make_current, normalize

    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {choice}, but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    device = normalize(choice)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {choice}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
        make_current(device)  # peft/bitsandbytes place new tensors on the current device
    return device


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir.resolve()))
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {_first_line(error)}") from None


def _load_model(config: TrainConfig, device: Any) -> tuple[Any, str]:
    """The base model, frozen: float32 on CPU, bfloat16 on CUDA; NF4 with double quant for qlora."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.method == "qlora":
        kwargs["quantization_config"] = bnb_config("nf4", dtype)
        # bitsandbytes quantizes while placing the weights, so the device is chosen at load time.
        kwargs["device_map"] = {"": device.index if on_cuda else "cpu"}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours is the only progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(str(config.model.resolve()), **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot load the model in {config.model}: {_first_line(error)}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Freezes the base and keeps norms in float32; no gradient checkpointing (small models, and
        # it would need use_cache handling).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if device.type == "cpu":
            keep_bnb_off_packed_cpu_path(model)  # its packed kernel has no autograd
        return model, "nf4"
    return model, str(dtype).removeprefix("torch.")


def _lm_loss(logits: Any, labels: Any) -> tuple[Any, int]:
    """Mean next-token cross-entropy over labelled tokens, and their count.

    Prompt and P-tuning put their virtual tokens before the input, so the logits of the real tokens
    are the last `labels.shape[1]`.
    """
    import torch

    logits = logits[:, -labels.shape[1] :].float()
    targets = labels[:, 1:]
    count = int((targets != data.IGNORE_INDEX).sum())
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=data.IGNORE_INDEX,
        reduction="sum",
    )
    return total / max(count, 1), count


def evaluate_loss(model: Any, dataset: list[data.Encoded], batch_size: int, pad_id: int, device: Any) -> float:
    """Token-weighted mean language-model loss over `dataset`, in eval mode (no dropout)."""
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    with torch.no_grad():
        for batch in data.batches(dataset, batch_size, list(range(len(dataset)))):
            inputs = data.collate(batch, pad_id, device)
            labels = inputs.pop("labels")
            logits = model(**inputs, use_cache=False).logits
            loss, n = _lm_loss(logits, labels)
            total += loss.item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def _save(model: Any, out: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (and nothing else of peft's) into `out`."""
    had_readme = (out / "README.md").exists()
    for name in _ADAPTER_FILES:
        (out / name).unlink(missing_ok=True)
    model.save_pretrained(str(out))
    if not had_readme:  # peft writes a model card template; the adapter does not need it
        (out / "README.md").unlink(missing_ok=True)


@contextlib.contextmanager
def _without_library_noise():
    """Hide warnings about the libraries' own internals, which a user of this command cannot act on."""
    with warnings.catch_warnings():
        # peft 0.21 calls transformers 5.x APIs it has deprecated (is_gradient_checkpointing, and
        # past_key_values for prefix tuning, renamed `cache`).
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
        # AdaLoRA saves layers pruned to rank 0 as (0, n) tensors, which peft mistakes for unsharded
        # DeepSpeed/FSDP weights.
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
