"""The systems `loraplex bench` compares, each running one batch of requests and returning a `RunResult`.

- `LoraplexSystem`: an `LLMEngine` in this process, driven synchronously (submit the batch, step
  until it is done), every request on the adapter it names (None: the base model).
- `GenerateSystem`: Hugging Face `generate` on the whole batch at once, greedy, exactly `new_tokens`
  tokens (`min_new_tokens`); with a `PeftModel` and `adapter_names` it is peft's mixed-adapter batch.
  A logits processor stamps the time of every decoding step (all rows get their token together).
- `GrpcSystem`: concurrent `GenerateStream` calls to a running `loraplex serve`, one per request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from loraplex.server.bench.measure import MemoryWatch, RunResult, now, synchronize, tensor_bytes


class LoraplexSystem:
    def __init__(self, engine):
        self.engine = engine
        self.device = engine.runner.device
        self._runs = 0

    @classmethod
    def create(cls, engine_config, adapters: dict[str, Path]) -> "LoraplexSystem":
        from loraplex.server.engine.engine import LLMEngine

        engine = LLMEngine(engine_config)
        for adapter_id, path in adapters.items():
            engine.register_adapter(adapter_id, str(path))
        return cls(engine)

    def model_bytes(self) -> int:
        """The base model's weights: parameters and buffers, and the fused projections (held by the kernel
        backend, in its layout)."""
        runner = self.engine.runner
        groups = {id(module.group): module.group for module in runner.lora_table.values()}
        fused = sum(g.projection.nbytes() for g in groups.values() if g.fused)
        return tensor_bytes(list(runner.model.parameters()) + list(runner.model.buffers())) + fused

    def resident_bytes(self) -> int:
        runner = self.engine.runner
        return self.model_bytes() + runner.lora_bytes() + runner.kv_cache.nbytes()

    def run(self, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
            cache_prompt: bool = True) -> RunResult:
        from loraplex.server.engine.engine import GenerationRequest
        from loraplex.server.model.sampling import SamplingParams

        engine = self.engine
        self._runs += 1
        times: list[list[float]] = [[] for _ in prompts]
        errors = []
        steps: list[float] = []
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

        def sink_for(i: int):
            def sink(output) -> None:
                if output.error is not None:
                    errors.append(output.error)
                times[i].extend([now() - start] * len(output.token_ids))
            return sink

        with MemoryWatch(self.device) as watch:
            start = now()
            for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
                request = GenerationRequest(f"bench-{self._runs}-{i}", prompt_token_ids=tuple(prompt),
                                            adapter_id=adapter, sampling=sampling, cache_prompt=cache_prompt)
                engine.add_request(request, sink_for(i))
            while engine.has_work():
                stats = engine.step()
                if stats is None:  # an adapter is loading in the background
                    engine.wait_for_work(0.001)
                elif stats.num_tokens == stats.num_sequences:
                    steps.append(stats.seconds)
            seconds = now() - start
        if errors:
            raise RuntimeError(f"loraplex failed a benchmark request: {errors[0]}")
        return RunResult(seconds, times, watch.peak_growth, steps)

    def close(self) -> None:
        self.engine.close()  # also waits for the adapter loader thread


def load_hf_model(model_dir: Path, dtype: str, quantization: str, device: str):
    """The base model as a user of transformers would load it (same dtype and quantization as the server)."""
    from transformers import AutoModelForCausalLM

    from loraplex.server.model.quantization import bnb_config, keep_bnb_off_packed_cpu_path

    torch_dtype = getattr(torch, dtype)
    kwargs: dict = {"dtype": torch_dtype}
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, torch_dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "none":
        model.to(device)
    if torch_dtype != torch.bfloat16:  # as the server does
        keep_bnb_off_packed_cpu_path(model)
    return model.eval().requires_grad_(False)


def load_peft_model(model_dir: Path, adapters: dict[str, Path], dtype: str, quantization: str, device: str):
    """A PeftModel holding every adapter under its id (the names `adapter_names` refers to)."""
    from peft import PeftModel

    base = load_hf_model(model_dir, dtype, quantization, device)
    items = list(adapters.items())
    model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
    for adapter_id, path in items[1:]:
        model.load_adapter(path, adapter_name=adapter_id)
    return model.eval().requires_grad_(False)


class GenerateSystem:
    """transformers' (or peft's) `generate` over the whole batch."""

    def __init__(self, model, device: str, pad_token_id: int | None):
        self.model = model
        self.device = torch.device(device)
        self.pad_token_id = pad_token_id

    def resident_bytes(self) -> int:
        return tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()))

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], adapter_names: list[str] | None, new_tokens: int) -> RunResult:
        from transformers import LogitsProcessor, LogitsProcessorList

        step_times: list[float] = []

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                step_times.append(now() - start)
                return scores

        input_ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
        with MemoryWatch(self.device) as watch:
            start = now()
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([Clock()]),
                pad_token_id=self.pad_token_id, **kwargs)
            synchronize(self.device)
            seconds = now() - start
        generated = output.shape[1] - input_ids.shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"generate made {generated} tokens, expected {new_tokens}")
        return RunResult(seconds, [list(step_times[:generated]) for _ in prompts], watch.peak_growth)


class GrpcSystem:
    """Concurrent streaming requests to a running server, one stream per request."""

    def __init__(self, address: str, admin_token: str | None = None):
        self.address = address
        self.admin_token = admin_token

    def adapter_ids(self) -> list[str]:
        """The server's registered LoRA-type adapters."""
        from loraplex.clients import Client

        with Client(self.address, admin_token=self.admin_token) as client:
            client.wait_until_serving(timeout=30)
            return [a.adapter_id for a in client.list_adapters() if a.peft_type in ("LORA", "ADALORA")]

    def run(self, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> RunResult:
        return asyncio.run(self._run(prompts, adapters, new_tokens))

    async def _run(self, prompts, adapters, new_tokens) -> RunResult:
        from loraplex.clients import AsyncClient

        times: list[list[float]] = [[] for _ in prompts]
        async with AsyncClient(self.address, admin_token=self.admin_token) as client:
            async def one(i: int) -> None:
                async for piece in client.stream(prompt_token_ids=prompts[i], adapter=adapters[i],
                                                 max_new_tokens=new_tokens, ignore_eos=True):
                    times[i].extend([now() - start] * len(piece.token_ids))

            start = now()
            await asyncio.gather(*(one(i) for i in range(len(prompts))))
            seconds = now() - start
        return RunResult(seconds, times)
