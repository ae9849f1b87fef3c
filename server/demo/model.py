"""`loraplex demo-model`: a small causal LM, built and saved locally, for the demo and the tests.

The model is a real transformers architecture (Llama, Mistral, Qwen2 or Qwen3) of about 3.5 M
parameters with grouped-query attention (4 query heads, 2 key/value heads), saved with
`save_pretrained` beside a byte-level BPE tokenizer trained with `tokenizers` on the corpus shipped
in `loraplex.server.data`. Optionally it is pretrained for a few hundred steps on that corpus, which
is enough for word-like English in the corpus' "Q: ...\\nA: ..." style; with `pretrain_steps=0` the
weights are random (what the oracle tests need: speed, not fluency).

Everything is derived from the seed: the same seed on the same machine gives the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from loraplex.server.errors import UserError

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPEC_FILE = "loraplex_demo_model.json"
DEFAULT_PRETRAIN_STEPS = 300


@dataclass(frozen=True)
class DemoModelSpec:
    arch: str = "llama"
    """One of ARCHITECTURES."""
    seed: int = 0
    """Seeds the weights and the pretraining data order."""
    vocab_size: int = 2048
    """Target size of the byte-level BPE vocabulary (special tokens included)."""
    hidden_size: int = 256
    intermediate_size: int = 704
    """A multiple of 32: bitsandbytes packs 4-bit weights for its CPU kernel in blocks of 32 rows."""
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    """Fewer than num_heads: grouped-query attention, as in the models users serve."""
    max_position_embeddings: int = 2048
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS
    """Causal-LM steps on the bundled corpus; 0 keeps the random initialisation."""
    pretrain_batch_size: int = 8
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UserError(f"--arch {self.arch!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.pretrain_steps < 0:
            raise UserError(f"--pretrain-steps must be >= 0, got {self.pretrain_steps}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise UserError("hidden_size must divide into num_heads, and num_heads into num_kv_heads")


def corpus_text() -> str:
    """The English corpus shipped with the package (tokenizer training and pretraining)."""
    return resources.files("loraplex.server.data").joinpath("corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on `text`, wrapped as a transformers fast tokenizer.

    No BOS is added; EOS (`<|endoftext|>`) ends documents and training examples.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def make_config(spec: DemoModelSpec, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if spec.arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)  # q/k/v carry a bias
    return Qwen3Config(head_dim=spec.hidden_size // spec.num_heads, **common)  # q/k RMS norms


def pretrain(model, tokenizer, spec: DemoModelSpec, log=print) -> float:
    """Causal-LM training on random windows of the corpus; returns the last smoothed loss."""
    import torch

    ids = torch.tensor(tokenizer.encode(corpus_text(), verbose=False))
    window = spec.pretrain_seq_len
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(step, spec.pretrain_steps) / spec.pretrain_steps)),
    )
    model.train()
    smoothed = float("nan")
    for step in range(spec.pretrain_steps):
        starts = torch.randint(0, len(ids) - window, (spec.pretrain_batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if step == 0 else 0.9 * smoothed + 0.1 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == spec.pretrain_steps:
            log(f"pretrain step {step + 1}/{spec.pretrain_steps}  loss {smoothed:.3f}")
    model.eval()
    return smoothed


def build_demo_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
    overwrite: bool = False,
    log=print,
) -> Path:
    """Build, optionally pretrain, and save the demo model and tokenizer into `out_dir`."""
    import torch

    spec = DemoModelSpec(arch=arch, seed=seed, pretrain_steps=pretrain_steps)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)

    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    tokenizer = train_tokenizer(corpus_text(), spec.vocab_size)
    config = make_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    final_loss = pretrain(model, tokenizer, spec, log=log) if spec.pretrain_steps else None

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        **asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_final_loss": final_loss,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / SPEC_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {spec.arch} demo model ({info['parameters'] / 1e6:.2f} M parameters) to {out}")
    return out


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo-model",
        help="build the small local demo model (and its tokenizer)",
        description="Build a small causal LM with a byte-level BPE tokenizer trained on the bundled "
        "corpus, optionally pretrain it briefly, and save both with save_pretrained.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model into")
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES, help="architecture (default llama)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default 0)")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=DEFAULT_PRETRAIN_STEPS,
        help=f"causal-LM steps on the bundled corpus, 0 for random weights (default {DEFAULT_PRETRAIN_STEPS})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    build_demo_model(
        args.out, arch=args.arch, seed=args.seed, pretrain_steps=args.pretrain_steps, overwrite=args.overwrite
    )
    return 0
