"""`loraplex train`: argparse -> TrainConfig -> trainer.train -> summary on stdout.

Options a method does not use default to None here, so TrainConfig can refuse them when given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loraplex.server.train.config import (
    DEFAULT_ADALORA_INIT_R,
    DEFAULT_ADALORA_TARGET_R,
    DEFAULT_DROPOUT,
    DEFAULT_EPOCHS,
    DEFAULT_NUM_VIRTUAL_TOKENS,
    DEFAULT_RANK,
    METHODS,
    TrainConfig,
    split_names,
)

EPILOG = """\
data: JSON Lines, one schema per file:
  {"prompt": "Q: Where do fish live?\\nA:", "completion": " In the sea, matey!"}   loss on the completion
  {"text": "Fish live in the sea."}                                               loss on all of it
The tokenizer's EOS is appended so the adapter learns to stop.

output: adapter_config.json + adapter_model.safetensors (PEFT's format, loads with
PeftModel.from_pretrained) and training_summary.json.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a PEFT adapter (LoRA, QLoRA, DoRA, AdaLoRA, IA3, prefix, prompt, P-tuning)",
        description="Train a PEFT adapter on a base model and save it in PEFT's format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    required = parser.add_argument_group("required")
    required.add_argument("--model", required=True, type=Path, metavar="DIR", help="base model directory")
    required.add_argument("--method", required=True, choices=METHODS, help="adapter type")
    required.add_argument("--data", required=True, type=Path, metavar="FILE", help="training data (.jsonl)")
    required.add_argument("--out", required=True, type=Path, metavar="DIR", help="adapter output directory")

    lora = parser.add_argument_group("LoRA family (lora, qlora, dora, adalora) and IA3")
    lora.add_argument(
        "--rank", "-r", type=int, metavar="R", help=f"LoRA rank (lora, qlora, dora; default {DEFAULT_RANK})"
    )
    lora.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) (rank-stabilised LoRA)")
    lora.add_argument("--dropout", type=float, help=f"dropout on the LoRA input (default {DEFAULT_DROPOUT})")
    lora.add_argument(
        "--target-modules", type=split_names, metavar="NAMES",
        help="comma-separated layer names, e.g. q_proj,v_proj (default: every linear layer in the decoder layers)",
    )
    lora.add_argument(
        "--feedforward-modules", type=split_names, metavar="NAMES",
        help="IA3: layers whose input is scaled (default: the MLP down projections)",
    )
    lora.add_argument(
        "--adalora-init-r", type=int, metavar="R", help=f"AdaLoRA starting rank (default {DEFAULT_ADALORA_INIT_R})"
    )
    lora.add_argument(
        "--adalora-target-r", type=int, metavar="R",
        help=f"AdaLoRA average final rank (default {DEFAULT_ADALORA_TARGET_R})",
    )

    prompt = parser.add_argument_group("prompt learning (prefix, prompt, p-tuning)")
    prompt.add_argument(
        "--num-virtual-tokens", type=int, metavar="N", help=f"virtual tokens (default {DEFAULT_NUM_VIRTUAL_TOKENS})"
    )
    prompt.add_argument("--prefix-projection", action="store_true", help="prefix: learn the prefix through an MLP")

    loop = parser.add_argument_group("training")
    loop.add_argument("--epochs", type=int, help=f"passes over the data (default {DEFAULT_EPOCHS} unless --max-steps)")
    loop.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    loop.add_argument("--lr", type=float, help="learning rate (default depends on the method)")
    loop.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per step (default 8)")
    loop.add_argument("--max-length", type=int, default=512, metavar="N", help="tokens per example (default 512)")
    loop.add_argument("--seed", type=int, default=0, help="seed for initialisation, dropout and data order (default 0)")
    loop.add_argument(
        "--eval-data", type=Path, metavar="FILE", help="held-out data; its loss is reported before and after"
    )
    loop.add_argument("--device", default="auto", metavar="DEVICE",
                      help="auto, cpu, cuda or cuda:N (default auto: CUDA when available)")
    loop.add_argument("--overwrite", action="store_true", help="replace the adapter in a non-empty --out")
    loop.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        method=args.method,
        data=args.data,
        out=args.out,
        eval_data=args.eval_data,
        rank=args.rank,
        alpha=args.alpha,
        rslora=bool(args.rslora),
        dropout=args.dropout,
        target_modules=args.target_modules,
        feedforward_modules=args.feedforward_modules,
        adalora_init_r=args.adalora_init_r,
        adalora_target_r=args.adalora_target_r,
        num_virtual_tokens=args.num_virtual_tokens,
        prefix_projection=bool(args.prefix_projection),
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    from loraplex.server.train.trainer import format_summary, train

    summary = train(config_from_args(args))
    print(format_summary(summary))
    return 0
