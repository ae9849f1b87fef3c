"""What `loraplex bench` runs on: a random-weight model and random peft adapters, saved to disk and read
back through the real load paths, and the requests of one measured batch.

Model: a Llama-shaped causal LM of the size asked for, random weights (`from_config`, fixed seed),
`save_pretrained` beside a byte-level BPE tokenizer trained on the bundled corpus (that corpus
supports about 2,080 tokens, so the vocabulary is at most that; prompts are random token ids).

Adapters: peft `LoraConfig` + `get_peft_model` + `save_pretrained`, one model per distinct rank; each
adapter's lora_A and lora_B are redrawn from its own seed with std 0.5/sqrt(fan_in), so B is not
zero and every adapter changes the output.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.server.bench.config import BenchConfig

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POPULARITY_LAWS = ("distinct", "uniform", "zipf")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 512
    num_layers: int = 8
    intermediate_size: int = 1376
    """About 8/3 · hidden (Llama's ratio), a multiple of 32 (bitsandbytes' CPU 4-bit packing)."""
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 2048

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide into num_heads, and num_heads into num_kv_heads")
        if min(self.hidden_size, self.num_layers, self.intermediate_size, self.vocab_size) < 1:
            raise ValueError("model sizes must be >= 1")

    @staticmethod
    def default_intermediate(hidden_size: int) -> int:
        return max(32, round(hidden_size * 8 / 3 / 32) * 32)


def build_model(out_dir: Path, shape: ModelShape, seed: int = 0, save_dtype: str = "float32") -> Path:
    """Save a random-weight Llama-shaped model and its tokenizer to `out_dir`; returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraplex.server.demo.model import corpus_text, train_tokenizer

    tokenizer = train_tokenizer(corpus_text(), shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, save_dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_adapters(model_dir: Path, out_root: Path, ranks: list[int], targets: tuple[str, ...], seed: int = 0,
                   save_dtype: str = "float32", log=lambda _msg: None) -> list[Path]:
    """One peft LoRA adapter per entry of `ranks` (rank, alpha = 2·rank), saved under out_root/aNNNN."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, save_dtype)
    paths: list[Path] = []
    models: dict[int, torch.nn.Module] = {}
    for index, rank in enumerate(ranks):
        if rank not in models:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                init_lora_weights=False)
            models[rank] = get_peft_model(base, config).to(dtype)
        model = models[rank]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    fan_in = param.shape[1]
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.copy_(noise * (0.5 / math.sqrt(fan_in)))
        path = out_root / f"a{index:04d}"
        model.save_pretrained(path)
        paths.append(path)
        if (index + 1) % 100 == 0:
            log(f"  {index + 1}/{len(ranks)} adapters written")
    return paths


def draw_adapters(law: str, num_adapters: int, count: int, rng: random.Random, zipf_s: float = 1.0) -> list[int]:
    """Adapter indices of `count` requests under a popularity law.

    distinct: count different adapters (a random sample; needs count <= num_adapters);
    uniform:  independent uniform draws; zipf: P(k) ∝ 1 / (k + 1)^s over a fixed random ranking.
    """
    if law == "distinct":
        if count > num_adapters:
            raise ValueError(f"distinct needs at least as many adapters ({num_adapters}) as requests ({count})")
        return rng.sample(range(num_adapters), count)
    if law == "uniform":
        return [rng.randrange(num_adapters) for _ in range(count)]
    if law == "zipf":
        ranking = list(range(num_adapters))
        random.Random(num_adapters).shuffle(ranking)  # which adapter is popular does not change between draws
        weights = [1.0 / (k + 1) ** zipf_s for k in range(num_adapters)]
        return rng.choices(ranking, weights=weights, k=count)
    raise ValueError(f"popularity law must be one of {POPULARITY_LAWS}, got {law!r}")


def random_prompts(vocab_size: int, count: int, length: int, rng: random.Random) -> list[list[int]]:
    """Random token ids, avoiding the first two ids (the tokenizer's EOS and PAD)."""
    low = 2 if vocab_size > 2 else 0
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(count)]


def prepare(config: BenchConfig, workdir: Path, log) -> tuple[Path, dict[str, Path]]:
    """Generate (or reuse, when workdir holds the same settings) the model and the adapters."""
    from loraplex.server.bench.workload import build_adapters, build_model

    save_dtype = config.dtype  # a half-precision run writes half the bytes (1B-parameter GPU runs)
    spec = {"shape": asdict(config.shape), "ranks": config.adapter_ranks, "targets": list(config.targets),
            "seed": config.seed, "save_dtype": save_dtype}
    spec_file = workdir / "bench-spec.json"
    model_dir, adapter_root = workdir / "model", workdir / "adapters"
    ids = [f"a{i:04d}" for i in range(config.num_adapters)]
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        log(f"reusing the model and {len(ids)} adapters in {workdir}")
    else:
        spec_file.unlink(missing_ok=True)
        log(f"generating a {config.shape.hidden_size} x {config.shape.num_layers} model and "
            f"{len(ids)} adapters in {workdir}")
        build_model(model_dir, config.shape, seed=config.seed, save_dtype=save_dtype)
        build_adapters(model_dir, adapter_root, config.adapter_ranks, config.targets, seed=config.seed,
                       save_dtype=save_dtype, log=log)
        spec_file.write_text(json.dumps(spec))
    return model_dir, {adapter_id: adapter_root / adapter_id for adapter_id in ids}
