"""Shared by the tests of every folder that runs an engine: peft-made adapters of every type, the peft
oracle, and a synchronous driver that checks the block manager after every step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig
from loraplex.server.engine.engine import GenerationRequest, LLMEngine, RequestOutput
from loraplex.server.model.quantization import bnb_config, keep_bnb_off_packed_cpu_path
from loraplex.server.model.sampling import SamplingParams
from loraplex.server.train.greedy import greedy_decode
from tests.block_invariants import assert_block_invariants

PROMPTS = [
    "Q: Where do fish live?\nA:",
    "The sea",
    "Q: What color is the sky on a clear day, and why does it turn grey when it rains?\nA:",
    "In the morning we took the train to the city. It was very hot",
    "Q: How do you make tea?\nA:",
]


def make_lora_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """A peft LoRA adapter with non-trivial random weights (B is not zero), saved to out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # scale the random weights so the adapter changes the greedy tokens clearly
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def load_peft(base_dir: Path, adapter_dir: Path | None, quantization: str = "none"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, torch.float32)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    keep_bnb_off_packed_cpu_path(model)  # as the server does: float32 means float32
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir)


# The reference for every adapter type: greedy decoding through the model's forward, the whole
# sequence recomputed each step (no cache). Returns the new tokens and their logprobs.
oracle = greedy_decode


@dataclass
class Collected:
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def logprobs(self) -> list[float]:
        return [p for o in self.outputs for p in o.logprobs]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def final(self) -> RequestOutput:
        assert self.outputs and self.outputs[-1].finished, "request did not finish"
        return self.outputs[-1]


def make_engine(model_dir: Path, *, quantization: str = "none", max_device_adapters: int = 8,
                max_host_adapters: int = 16, max_rank: int = 64, kv_tokens: int = 8192, block_size: int = 16,
                scheduler=None, adapter_root: Path | None = None, adapter_dtype: str = "auto",
                prefix_caching: bool = True) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(path=model_dir, quantization=quantization, dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=block_size, num_tokens=kv_tokens, prefix_caching=prefix_caching),
        adapters=AdapterConfig(max_rank=max_rank, max_device_adapters=max_device_adapters,
                               max_host_adapters=max_host_adapters, adapter_root=adapter_root,
                               dtype=adapter_dtype),
        scheduler=scheduler,
    )
    return LLMEngine(config)


def submit(engine: LLMEngine, request_id: str, prompt: str | list[int], adapter: str | None = None,
           max_new_tokens: int = 12, cache_prompt: bool = True, **sampling) -> Collected:
    collected = Collected()
    ids = prompt if isinstance(prompt, list) else None
    request = GenerationRequest(
        request_id=request_id,
        prompt=None if ids is not None else prompt,
        prompt_token_ids=tuple(ids) if ids is not None else None,
        adapter_id=adapter,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, return_logprobs=True, **sampling),
        cache_prompt=cache_prompt,
    )
    engine.add_request(request, collected.outputs.append)
    return collected


def run_until_done(engine: LLMEngine, max_steps: int = 10_000) -> int:
    """Step until idle, checking the block manager's invariants after every step."""
    steps = 0
    while engine.has_work():
        if engine.step() is None:
            engine.wait_for_work(0.01)
        assert_block_invariants(engine.block_manager, [*engine.scheduler.running, *engine.scheduler.waiting])
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return steps


# Every PEFT adapter type, each with non-default options where peft has them.
TYPE_CONFIGS = {
    "lora": lambda: _peft().LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: _peft().LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    "adalora": lambda: _peft().AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=12,
                                             target_modules=["q_proj", "v_proj", "up_proj"]),
    "ia3": lambda: _peft().IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]),
    "prefix": lambda: _peft().PrefixTuningConfig(num_virtual_tokens=5),
    "prefix-projection": lambda: _peft().PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True,
                                                            encoder_hidden_size=48),
    "prompt": lambda: _peft().PromptTuningConfig(num_virtual_tokens=7),
    "p-tuning": lambda: _peft().PromptEncoderConfig(num_virtual_tokens=6, encoder_hidden_size=64),
}


def _peft():
    import peft

    return peft


def make_adapter(base_dir: Path, out_dir: Path, kind: str, seed: int) -> Path:
    """A peft adapter of `kind` with non-trivial random weights (none of peft's identity inits)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = TYPE_CONFIGS[kind]()
    config.task_type = "CAUSAL_LM"
    model = _peft().get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_E" in name:  # AdaLoRA starts with E = 0, i.e. no effect
                param.normal_(0.0, 0.5)
            elif "ia3_l" in name or "lora_magnitude_vector" in name:  # ones / the base norms
                param.mul_(1.0 + 0.3 * torch.randn_like(param))
            elif "lora_" in name:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out_dir)
    return out_dir
