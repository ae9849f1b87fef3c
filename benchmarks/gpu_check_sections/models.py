"""What the engine, nf4, decode, load and train sections run on: a random GQA Llama, one peft adapter of
every kind, an engine over them, and peft's side of each comparison."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from gpu_check_sections.context import Context

ADAPTER_KINDS = ("lora", "dora", "adalora", "ia3", "prefix", "prompt", "p-tuning")


def build_model(ctx: Context, hidden: int, layers: int, intermediate: int) -> Path:
    """A random GQA Llama saved in the run's dtype. Its LM head is scaled up so that the logits spread
    (a freshly initialised model's greedy choices would nearly all be near-ties)."""
    from safetensors.torch import load_file, save_file

    from loraplex.server.bench.workload import ModelShape, build_model as build

    out = ctx.work / f"model-{hidden}x{layers}"
    if (out / "config.json").is_file():
        return out
    s = ctx.sizes
    shape = ModelShape(hidden_size=hidden, num_layers=layers, intermediate_size=intermediate, num_heads=s.heads,
                       num_kv_heads=s.kv_heads, vocab_size=s.vocab)
    build(out, shape, seed=0, save_dtype=ctx.dtype)
    weights_file = out / "model.safetensors"
    weights = load_file(weights_file)
    weights["lm_head.weight"] = weights["lm_head.weight"] * 8
    save_file(weights, weights_file, metadata={"format": "pt"})
    return out


def peft_config(kind: str):
    import peft

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=linear, init_lora_weights=False,
                                        rank_pattern={"q_proj": 4, "down_proj": 8}),
        "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False,
                                        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
        "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=12,
                                              target_modules=["q_proj", "v_proj", "up_proj"]),
        "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
        "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=5),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=7),
        "p-tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=6, encoder_hidden_size=64),
    }[kind]()


def build_adapters(ctx: Context, model_dir: Path, kinds: tuple[str, ...] = ADAPTER_KINDS) -> dict[str, Path]:
    """One peft adapter of every kind, with random weights that change the model's output (none of
    peft's identity initialisations), saved under the work directory."""
    import peft
    from transformers import AutoModelForCausalLM

    paths = {}
    for kind in kinds:
        seed = ADAPTER_KINDS.index(kind)
        out = ctx.work / f"{model_dir.name}-{kind}"
        paths[kind] = out
        if (out / "adapter_config.json").is_file():
            continue
        torch.manual_seed(seed)
        config = peft_config(kind)
        config.task_type = "CAUSAL_LM"
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if "lora_E" in name:  # AdaLoRA starts with E = 0: no effect
                    param.normal_(0.0, 0.5)
                elif "ia3_l" in name or "lora_magnitude_vector" in name:  # ones / the base norms
                    param.mul_(1.0 + 0.3 * torch.randn_like(param))
                elif "lora_" in name:
                    param.normal_(0.0, 0.7 / math.sqrt(param.shape[-1]))
        model.save_pretrained(out)
    return paths


def make_engine(ctx: Context, model_dir: Path, quantization: str = "none", slots: int = 8, max_rank: int = 16,
                kv_tokens: int = 8192):
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(path=model_dir, quantization=quantization, dtype=ctx.dtype, device=str(ctx.device)),
        cache=CacheConfig(num_tokens=kv_tokens),
        adapters=AdapterConfig(max_rank=max_rank, max_device_adapters=slots, max_host_adapters=max(slots, 32)),
    )
    return LLMEngine(config)


def release(engine) -> None:
    """Stop the engine's loader thread (it holds the runner) and give its device memory back."""
    import gc

    engine.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(engine, requests: dict[str, tuple[list[int], str | None]], new_tokens: int,
             on_step=None) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs for each request id, all submitted at once."""
    from loraplex.server.engine.engine import GenerationRequest
    from loraplex.server.model.sampling import SamplingParams

    outputs: dict[str, list] = {rid: [] for rid in requests}
    for rid, (prompt, adapter) in requests.items():
        params = SamplingParams(max_new_tokens=new_tokens, return_logprobs=True, ignore_eos=True)
        engine.add_request(GenerationRequest(rid, prompt_token_ids=tuple(prompt), adapter_id=adapter,
                                             sampling=params), outputs[rid].append)
    steps = 0
    while engine.has_work():
        started = time.perf_counter()
        stats = engine.step()
        if stats is None:
            engine.wait_for_work(0.01)
        elif on_step is not None:
            on_step(stats, started)
        steps += 1
        if steps > 100_000:
            raise RuntimeError("the engine did not finish")
    result = {}
    for rid, outs in outputs.items():
        if not outs or not outs[-1].finished:
            raise RuntimeError(f"request {rid} did not finish")
        result[rid] = ([t for o in outs for t in o.token_ids], [p for o in outs for p in o.logprobs])
    return result


def load_peft(ctx: Context, model_dir: Path, adapter: Path | None, quantization: str):
    """The base model as `loraplex bench` loads it for transformers, with `adapter` through peft."""
    from peft import PeftModel

    from loraplex.server.bench.systems import load_hf_model

    model = load_hf_model(model_dir, ctx.dtype, quantization, str(ctx.device))
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()


@torch.no_grad()
def scored(model, prompt: list[int], tokens: list[int], device) -> list[float]:
    """peft's logprob of each of `tokens` after the prompt and the tokens before it (one forward)."""
    ids = torch.tensor([prompt + tokens], device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()
    n = len(tokens)
    logprobs = torch.log_softmax(logits[-n - 1 : -1], dim=-1)  # positions that predict each token
    return logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()


def agreement(a: list[int], b: list[int]) -> tuple[float, int | None]:
    """Fraction of positions before the first difference, and that position (None: equal)."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    n = max(len(a), len(b), 1)
    return (n if first is None else first) / n, first
