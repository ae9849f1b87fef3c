"""The one prepared GPU check of loraplex: what a session lent a GPU runs first.

    python benchmarks/gpu_check.py                 # CUDA: <= 8 min on an H100/H200
    python benchmarks/gpu_check.py --smoke         # CPU, tiny shapes, float32, Triton interpreter (the logic only)

The JSON result goes to ``--json FILE``, else to ``$OUT/gpu_check.json`` when ``$OUT`` is set; it is
rewritten after every section, so a run stopped early keeps what it found. HF_HUB_OFFLINE=1 is set
before anything imports huggingface_hub (the device has no network; every model here is made locally).
Sections, most information first; each is independent (a failure is recorded with its traceback and
the next section runs):

0. preflight What the rest needs from the machine, written before any other section (whatever --only
             says): a C compiler and Python.h, with which Triton builds its launcher stubs (without
             either no Triton kernel launches on CUDA: kernels, attention, engine, nf4, decode fail),
             and accelerate (without it transformers cannot load the 4-bit model: nf4, train qlora).
1. kernels   Triton shrink/expand in bfloat16 and float16 against the float32 reference (mixed ranks,
             poisoned rank padding, 1-3 unequal slices, every adapter mix), then one CUDA graph captured
             once and replayed with new slots.
2. attention The Triton paged attention kernel in bfloat16 and float16 against the float32 reference
             (decode and prefill chunks, ragged contexts ending mid-block, GQA, a window, prefix padding),
             then decode at 4,096-token contexts (64 sequences, 32 query / 8 KV heads, head_dim 128): K/V
             bytes over kernel time against measured copy bandwidth (target >= ATTENTION_TARGET), the
             time of the torch path (gathered K/V + SDPA) on the same batch, and the same fraction for
             4 sequences (keys split over programs).
3. engine    The whole engine in bfloat16 on a random GQA Llama with every adapter type (LoRA with
             mixed ranks, DoRA, AdaLoRA, IA3, prefix, prompt, P-tuning) and the base model in one mixed
             batch, against each request alone and against peft's forward: the largest logprob
             difference (peft scoring the engine's own tokens; bound BF16_LOGPROB_TOL), the greedy token
             agreement rate and the first differing position (bf16 near-ties may flip; wrong adapters,
             devices or offsets show as large logprob differences from the first token on).
4. nf4       The same on an NF4 base (DoRA's norms from the dequantized 4-bit weights), and the peak GPU
             memory of a 2,048-token prefill.
5. decode    Decode step time at batch 64 (64 requests, each its own rank-16 LoRA adapter) against the
             bandwidth floor (base weights + each distinct adapter's bytes once / measured copy
             bandwidth; target <= DECODE_FLOOR_TARGET), whether decode ran as captured CUDA graphs, the same
             batch's decode throughput with 8 distinct adapters over the base model's (target >=
             MIXED_OVER_BASE_TARGET), kernel launches per step and the GPU-busy fraction of a step.
6. load      Host -> device adapter load time (host tier -> device slot: pinned, already in the
             serving dtype, copied on the runner's copy stream) against the PCIe floor (adapter bytes /
             measured pinned host-to-device bandwidth; target <= 2x), and the host time until
             ``load_slot`` returns (what the step loop waits for).
7. train     ``loraplex train --method qlora`` and ``--method dora`` for a few dozen steps on the GPU:
             the loss falls, and the adapter is then served (its greedy tokens against peft's).

With ``--smoke`` every section runs on the CPU at toy sizes; what only CUDA can show (graphs, peak
memory, launches, busy fraction, PCIe) is recorded as "skipped: needs CUDA".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported (by transformers, peft)
SMOKE = "--smoke" in sys.argv
if SMOKE:  # before the first import of triton; the engine's LoRA then runs the interpreted Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LORAPLEX_LORA_BACKEND"] = "triton"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Largest |logprob(engine) - logprob(peft)| of the engine's own tokens accepted in bfloat16 (NF4 too:
# both sides dequantize the same 4-bit weights); float32 (--smoke) agrees to FLOAT32_LOGPROB_TOL.
BF16_LOGPROB_TOL = 0.1
FLOAT32_LOGPROB_TOL = 1e-3
NEEDS_CUDA = "skipped: needs CUDA"
# Paged attention at 4k contexts must read its K/V at this fraction of measured copy bandwidth or more.
ATTENTION_TARGET = 0.7
DECODE_FLOOR_TARGET = 1.3  # decode step at batch 64, 64 distinct adapters: at most this times the bandwidth floor
MIXED_OVER_BASE_TARGET = 0.85  # decode throughput with 8 distinct adapters over the base model's, same batch


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    new_tokens: int
    prompt_len: int
    prefill_tokens: int       # section 4's long prefill
    decode_batch: int         # section 5
    decode_hidden: int
    decode_layers: int
    decode_intermediate: int
    train_steps: int


GPU_SIZES = Sizes(hidden=1024, layers=4, intermediate=2816, heads=16, kv_heads=4, vocab=2048, new_tokens=16,
                  prompt_len=24, prefill_tokens=2048, decode_batch=64, decode_hidden=2048, decode_layers=8,
                  decode_intermediate=5632, train_steps=30)
SMOKE_SIZES = Sizes(hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, vocab=300, new_tokens=4,
                    prompt_len=8, prefill_tokens=64, decode_batch=3, decode_hidden=64, decode_layers=2,
                    decode_intermediate=160, train_steps=3)


@dataclass
class Context:
    device: torch.device
    dtype: str
    sizes: Sizes
    work: Path
    smoke: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tolerance(self) -> float:
        return FLOAT32_LOGPROB_TOL if self.dtype == "float32" else BF16_LOGPROB_TOL

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- 0. preflight
def section_preflight(ctx: Context) -> dict:
    """The C compiler and Python.h as Triton finds them (``triton/runtime/build.py``: $CC, else gcc, else
    clang; the include directory of the posix_prefix scheme where the default is Debian's posix_local),
    and accelerate; each entry says what fails without it."""
    triton_fails = "every Triton launch on CUDA fails (Triton compiles its launcher stubs with it): " \
                   "sections kernels, attention, engine, nf4, decode"
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    found = cc is not None and shutil.which(cc) is not None
    compiler = dict(ok=found, path=shutil.which(cc) if found else cc,
                    missing=None if found else f"no C compiler ($CC, gcc or clang on PATH): {triton_fails}")
    scheme = sysconfig.get_default_scheme()
    include = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    header = (include / "Python.h").is_file()
    python_h = dict(ok=header, path=str(include / "Python.h"),
                    missing=None if header else f"no Python.h in {include} (python3-dev): {triton_fails}")
    try:
        import accelerate

        accel = dict(ok=True, version=accelerate.__version__, missing=None)
    except ImportError as error:
        accel = dict(ok=False, version=None,
                     missing=f"accelerate does not import ({error}): transformers cannot load a 4-bit model "
                             f"with a device_map: sections nf4, train (qlora)")
    checks = dict(c_compiler=compiler, python_h=python_h, accelerate=accel)
    missing = [check["missing"] for check in checks.values() if not check["ok"]]
    return dict(ok=not missing, **checks, missing=missing)


# ----------------------------------------------------------------------------- 1. kernels
def section_kernels(ctx: Context) -> dict:
    from common.lora_checks import CASES, SMOKE_CASES, check_case, check_graph

    cases, dtypes = CASES, (torch.bfloat16, torch.float16)
    if ctx.smoke:  # the interpreter computes bfloat16 wrongly: float16 and float32 only
        cases, dtypes = SMOKE_CASES, (torch.float16, torch.float32)
    rows = []
    for dtype in dtypes:
        for seed, (tokens, hidden, widths, mix) in enumerate(cases):
            error = check_case(tokens, hidden, widths, mix, dtype, ctx.device, seed=seed)
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), tokens=tokens, hidden=hidden,
                             widths=list(widths), mix=mix, ok=error is None, error=error))
    graph = check_graph(ctx.device) if ctx.cuda else NEEDS_CUDA
    failures = sum(not row["ok"] for row in rows) + (graph not in (None, NEEDS_CUDA))
    return dict(ok=failures == 0, failures=failures, cases=rows,
                cuda_graph="ok" if graph is None else graph)


# ----------------------------------------------------------------------------- 2. attention
def section_attention(ctx: Context) -> dict:
    from types import SimpleNamespace

    from common.attention import workload
    from common.timing import timer
    from loraplex.kernels.triton.paged_attention import decode_splits
    from loraplex.server.model import attention
    from loraplex.server.model.step_buffers import StepBuffers

    heads = dict(heads=32, kv_heads=8, head_dim=128) if ctx.cuda else dict(heads=4, kv_heads=2, head_dim=16)
    # (query_lens, kv_lens, window, skips): decode + chunks, a window, prefix padding hidden
    cases = [([1, 1, 7, 1, 16], [1, 37, 40, 130, 16], None, None),
             ([1, 5, 1], [50, 29, 9], 12, None),
             ([1, 3], [45, 23], None, [(13, 16), (13, 16)])]
    dtypes = (torch.float16, torch.float32) if ctx.smoke else (torch.bfloat16, torch.float16)
    rows = []
    for dtype in dtypes:
        tolerance = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
        for seed, (query_lens, kv_lens, window, skips) in enumerate(cases):
            load = workload(ctx.device, dtype, query_lens, kv_lens, **heads, window=window, skips=skips, seed=seed)
            error = (load.run().float() - load.reference()).abs().max().item()
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), query_lens=query_lens, kv_lens=kv_lens,
                             window=window, prefix=skips is not None, max_abs_error=error, ok=error <= tolerance))

    batch, context = (64, 4096) if ctx.cuda else (2, 40)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    load = workload(ctx.device, dtype, [1] * batch, [context] * batch, **heads, seed=7)
    bench = timer(ctx.device)
    kernel_s = bench(load.run)
    bandwidth = copy_bandwidth(ctx)
    fraction = load.kv_bytes / kernel_s / bandwidth
    # a small batch: its keys split over programs (decode_splits) to fill the GPU
    small = workload(ctx.device, dtype, [1] * 4, [context] * 4, **heads, seed=8)
    small_s = bench(small.run)

    # the torch path on the same batch: gathered blocks, one SDPA call
    cache = attention.PagedKVCache(1, load.k_cache.shape[0] // load.block_size, load.block_size,
                                   heads["kv_heads"], heads["head_dim"], dtype, ctx.device)
    cache.k[0], cache.v[0] = load.k_cache, load.v_cache
    buffers = StepBuffers(ctx.device)
    buffers.begin(8 * (4 * batch + 2 * sum(len(table) for table in load.tables) + 64))
    decode = attention.DecodeBatch.build(list(range(batch)), load.tables, load.kv_lens, load.block_size, buffers.put,
                                         attention.GATHER_MAX_ELEMENTS // (heads["kv_heads"] * heads["head_dim"]))
    buffers.send()
    meta = attention.AttentionMeta(cache, torch.empty(0, dtype=torch.long, device=ctx.device), [], decode=decode)
    query = load.q.transpose(0, 1)[None]
    module = SimpleNamespace(layer_idx=0)
    torch_s = bench(lambda: attention.attend(module, query, None, None, meta, None, None))
    failures = sum(not row["ok"] for row in rows)
    return dict(ok=failures == 0 and (fraction >= ATTENTION_TARGET or not ctx.cuda), failures=failures, cases=rows,
                decode_batch=batch, context=context, kv_bytes=load.kv_bytes, kernel_s=kernel_s,
                copy_bandwidth_gb_s=bandwidth / 1e9, kv_gb_s=load.kv_bytes / kernel_s / 1e9,
                fraction_of_copy_bandwidth=fraction, target=ATTENTION_TARGET, torch_path_s=torch_s,
                speedup_over_torch_path=torch_s / kernel_s, small_batch=4,
                small_batch_splits=decode_splits(4 * heads["kv_heads"], ctx.device), small_batch_s=small_s,
                small_batch_fraction_of_copy_bandwidth=small.kv_bytes / small_s / bandwidth)


# ----------------------------------------------------------------------------- models and adapters
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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.server.model.quantization import bnb_config, keep_bnb_off_packed_cpu_path

    dtype = getattr(torch, ctx.dtype)
    kwargs: dict = {"dtype": dtype}
    if quantization != "none":
        kwargs.update(quantization_config=bnb_config(quantization, dtype), device_map={"": str(ctx.device)})
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "none":
        model.to(ctx.device)
    if dtype != torch.bfloat16:
        keep_bnb_off_packed_cpu_path(model)
    model = model if adapter is None else PeftModel.from_pretrained(model, adapter)
    return model.eval()


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


def compare_with_peft(ctx: Context, quantization: str, kinds: tuple[str, ...] = ADAPTER_KINDS) -> dict:
    """Every adapter kind and the base in one mixed batch vs each alone vs peft's forward."""
    from loraplex.server.train.greedy import greedy_decode

    s = ctx.sizes
    model_dir = build_model(ctx, s.hidden, s.layers, s.intermediate)
    adapters = build_adapters(ctx, model_dir, kinds)
    engine = make_engine(ctx, model_dir, quantization, slots=len(adapters))
    registration = {}
    for kind, path in adapters.items():
        started = time.perf_counter()
        engine.register_adapter(kind, str(path))
        registration[kind] = time.perf_counter() - started
    gen = torch.Generator().manual_seed(1)
    vocab = engine.runner.vocab_size
    prompts = {name: torch.randint(3, vocab, (s.prompt_len,), generator=gen).tolist() for name in ("base", *adapters)}
    requests = {name: (prompts[name], None if name == "base" else name) for name in prompts}
    mixed = generate(engine, requests, s.new_tokens)
    alone = {name: generate(engine, {name: request}, s.new_tokens)[name] for name, request in requests.items()}
    release(engine)
    rows = {}
    for name in requests:
        model = load_peft(ctx, model_dir, None if name == "base" else adapters[name], quantization)
        prompt = prompts[name]
        tokens, logprobs = mixed[name]
        peft_logprobs = scored(model, prompt, tokens, ctx.device)
        peft_tokens, _ = greedy_decode(model, prompt, s.new_tokens, None)
        del model
        rate_alone, first_alone = agreement(tokens, alone[name][0])
        rate_peft, first_peft = agreement(tokens, peft_tokens)
        common = len(tokens) if first_alone is None else first_alone
        rows[name] = dict(
            max_logprob_diff_vs_peft=max(abs(a - b) for a, b in zip(logprobs, peft_logprobs)),
            token_agreement_vs_peft=rate_peft, first_diff_vs_peft=first_peft,
            token_agreement_vs_alone=rate_alone, first_diff_vs_alone=first_alone,
            max_logprob_diff_vs_alone=max((abs(a - b) for a, b in zip(logprobs[:common], alone[name][1][:common])),
                                          default=0.0),
            register_s=registration.get(name))
    worst = max(row["max_logprob_diff_vs_peft"] for row in rows.values())
    return dict(ok=worst <= ctx.tolerance, tolerance=ctx.tolerance, worst_logprob_diff=worst,
                mean_token_agreement_vs_peft=statistics.mean(r["token_agreement_vs_peft"] for r in rows.values()),
                adapters=rows, model=str(model_dir))


# ----------------------------------------------------------------------------- 3. / 4.
def section_engine(ctx: Context) -> dict:
    return compare_with_peft(ctx, "none")


def section_nf4(ctx: Context) -> dict:
    # --smoke: the kinds whose 4-bit handling differs (DoRA's dequantized norms, LoRA/IA3 on unfused layers)
    result = compare_with_peft(ctx, "nf4", ("lora", "dora", "ia3") if ctx.smoke else ADAPTER_KINDS)
    s = ctx.sizes
    model_dir = build_model(ctx, s.hidden, s.layers, s.intermediate)
    engine = make_engine(ctx, model_dir, "nf4", slots=2, kv_tokens=s.prefill_tokens + 64)
    engine.register_adapter("dora", str(build_adapters(ctx, model_dir, ("dora",))["dora"]))
    prompt = torch.randint(3, engine.runner.vocab_size, (s.prefill_tokens,),
                           generator=torch.Generator().manual_seed(2)).tolist()
    if ctx.cuda:
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
    started = time.perf_counter()
    generate(engine, {"long": (prompt, "dora")}, 1)
    ctx.sync()
    release(engine)
    result["prefill_tokens"] = s.prefill_tokens
    result["prefill_s"] = time.perf_counter() - started
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated(ctx.device) - before
        result["prefill_peak_bytes_above_resident"] = peak
        result["prefill_peak_bytes_per_token"] = peak / s.prefill_tokens
        result["resident_bytes"] = before
    else:
        result["prefill_peak_bytes_above_resident"] = NEEDS_CUDA
    return result


# ----------------------------------------------------------------------------- 5. decode
def copy_bandwidth(ctx: Context) -> float:
    from common.timing import copy_bandwidth as measure

    return measure(ctx.device)


def section_decode(ctx: Context) -> dict:
    from loraplex.server.bench.workload import ALL_PROJECTIONS, build_adapters as build_loras

    s = ctx.sizes
    model_dir = build_model(ctx, s.decode_hidden, s.decode_layers, s.decode_intermediate)
    root = ctx.work / "decode-adapters"
    paths = build_loras(model_dir, root, [16] * s.decode_batch, ALL_PROJECTIONS, save_dtype=ctx.dtype) \
        if not root.is_dir() else sorted(root.iterdir())
    engine = make_engine(ctx, model_dir, slots=s.decode_batch, kv_tokens=s.decode_batch * 128)
    for i, path in enumerate(paths):
        engine.register_adapter(f"a{i}", str(path))
    gen = torch.Generator().manual_seed(3)
    requests = {f"r{i}": (torch.randint(3, engine.runner.vocab_size, (32,), generator=gen).tolist(), f"a{i}")
                for i in range(s.decode_batch)}
    new_tokens = 16 if not ctx.smoke else 4

    def decode_median(batch: dict) -> tuple[float, int]:
        """Median time of the pure decode steps (every sequence one token) of `batch`, and their count."""
        times: list[float] = []

        def timed(stats, started):
            ctx.sync()
            if stats.num_tokens == s.decode_batch and stats.num_sequences == s.decode_batch:
                times.append(time.perf_counter() - started)

        generate(engine, batch, new_tokens, on_step=timed)
        return (statistics.median(times) if times else float("nan")), len(times)

    median, timed_steps = decode_median(requests)
    # the same batch on the base model, and with 8 distinct adapters (the throughput target's mix)
    base_median, _ = decode_median({rid: (prompt, None) for rid, (prompt, _) in requests.items()})
    mixed8 = {rid: (prompt, f"a{i % 8}") for i, (rid, (prompt, _)) in enumerate(requests.items())}
    mixed8_median, _ = decode_median(mixed8)
    base_bytes = weight_bytes(engine.runner)
    weights = [engine.get_adapter(f"a{i}") for i in range(s.decode_batch)]
    adapters_bytes = sum(info.size_bytes for info in weights)  # the host tier is in the serving dtype
    bandwidth = copy_bandwidth(ctx)
    floor = (base_bytes + adapters_bytes) / bandwidth
    result = dict(ok=bool(timed_steps), batch=s.decode_batch, distinct_adapters=s.decode_batch,
                  decode_graphs=engine.runner.decode_graphs is not None,
                  decode_steps_timed=timed_steps, step_s_median=median,
                  base_bytes=base_bytes, adapter_bytes=adapters_bytes, copy_bandwidth_gb_s=bandwidth / 1e9,
                  floor_s=floor, step_over_floor=median / floor, step_over_floor_target=DECODE_FLOOR_TARGET,
                  base_step_s_median=base_median, mixed8_step_s_median=mixed8_median,
                  mixed8_over_base_throughput=base_median / mixed8_median,
                  mixed8_over_base_target=MIXED_OVER_BASE_TARGET)
    result.update(profile_step(ctx, engine, requests))
    if not ctx.cuda:  # the profiler ran, but a CPU step launches no kernels
        result.update(kernel_launches_per_step=NEEDS_CUDA, copies_per_step=NEEDS_CUDA, gpu_busy_fraction=NEEDS_CUDA)
    release(engine)
    return result


def weight_bytes(runner) -> int:
    """Bytes of the model's resident weights (views of one fused weight counted once)."""
    storages = {}
    tensors = list(runner.model.parameters())
    tensors += [t for m in runner.lora_table.values() if m.group.fused
                for t in (m.group.projection.weight, m.group.projection.bias) if t is not None]
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # oneDNN's packed layout has no plain storage
            storages[id(t)] = t.numel() * t.element_size()
            continue
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def profile_step(ctx: Context, engine, requests) -> dict:
    """Kernel launches and GPU-busy fraction of one decode step of the same batch."""
    from torch.profiler import ProfilerActivity, profile

    from loraplex.server.engine.engine import GenerationRequest
    from loraplex.server.model.sampling import SamplingParams

    for rid, (prompt, adapter) in requests.items():
        engine.add_request(GenerationRequest(f"p-{rid}", prompt_token_ids=tuple(prompt), adapter_id=adapter,
                                             sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)),
                           lambda output: None)
    batch = len(requests)
    for _ in range(64):  # through the prefill to the first decode steps of the whole batch
        stats = engine.step()
        if stats is not None and stats.num_tokens == batch and stats.num_sequences == batch:
            break
    engine.step()  # one more decode step, warm
    ctx.sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])) as prof:
        started = time.perf_counter()
        engine.step()
        ctx.sync()
        wall = time.perf_counter() - started
    device_events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    # kernels of one stream do not overlap, so their summed time is the time the GPU was busy (µs)
    busy = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in device_events) * 1e-6
    while engine.has_work():
        engine.step()
    return dict(kernel_launches_per_step=len(kernels), copies_per_step=len(device_events) - len(kernels),
                gpu_busy_fraction=busy / wall, profiled_step_s=wall)


# ----------------------------------------------------------------------------- 6. load
def section_load(ctx: Context) -> dict:
    from loraplex.server.adapters.loader import load_adapter

    s = ctx.sizes
    model_dir = build_model(ctx, s.decode_hidden, s.decode_layers, s.decode_intermediate)
    root = ctx.work / "decode-adapters"
    if not root.is_dir():
        from loraplex.server.bench.workload import ALL_PROJECTIONS, build_adapters as build_loras

        build_loras(model_dir, root, [16], ALL_PROJECTIONS, save_dtype=ctx.dtype)
    engine = make_engine(ctx, model_dir, slots=2, kv_tokens=256)
    runner = engine.runner
    weights = runner.host_tier(load_adapter(sorted(root.iterdir())[0], runner.base_spec, max_rank=16))
    element = torch.finfo(runner.adapter_dtype).bits // 8
    device_bytes = sum(m.a.numel() + m.b.numel() for m in weights.lora.values()) * element
    times, returned = [], []
    for _ in range(5):
        ctx.sync()
        started = time.perf_counter()
        runner.load_slot(0, weights)
        returned.append(time.perf_counter() - started)
        ctx.sync()
        times.append(time.perf_counter() - started)
    result = dict(ok=True, adapter_device_bytes=device_bytes, host_bytes=weights.size_bytes,
                  host_pinned=all(t.is_pinned() for t in weights.tensors()) if ctx.cuda else NEEDS_CUDA,
                  load_s_median=statistics.median(times), load_s_all=times,
                  load_slot_returns_s_median=statistics.median(returned))
    if ctx.cuda:
        pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        target = torch.empty_like(pinned, device=ctx.device)
        target.copy_(pinned, non_blocking=True)
        ctx.sync()
        started = time.perf_counter()
        for _ in range(5):
            target.copy_(pinned, non_blocking=True)
        ctx.sync()
        bandwidth = 5 * pinned.numel() / (time.perf_counter() - started)
        floor = device_bytes / bandwidth
        result.update(pcie_gb_s=bandwidth / 1e9, floor_s=floor, load_over_floor=result["load_s_median"] / floor,
                      target_met=result["load_s_median"] <= 2 * floor)
    else:
        result["pcie_gb_s"] = NEEDS_CUDA
    release(engine)
    return result


# ----------------------------------------------------------------------------- 7. train
def section_train(ctx: Context) -> dict:
    from importlib import resources

    from loraplex.server.train import cli as train_cli
    from loraplex.server.train.greedy import greedy_decode

    # `loraplex train`'s own parser and runner, without the rest of the CLI (its gRPC client needs
    # grpcio/protobuf versions a bare GPU image may lack)
    parser = argparse.ArgumentParser(prog="loraplex")
    train_cli.add_parser(parser.add_subparsers(dest="command"))

    s = ctx.sizes
    model_dir = build_model(ctx, s.hidden, s.layers, s.intermediate)
    data = Path(str(resources.files("loraplex.server.data").joinpath("pirate.jsonl")))
    result: dict = {"ok": True}
    for method, quantization in (("qlora", "nf4"), ("dora", "none")):
        out = ctx.work / f"trained-{method}"
        args = ["train", "--model", str(model_dir), "--method", method, "--data", str(data), "--out", str(out),
                "--max-steps", str(s.train_steps), "--batch-size", "4", "--lr", "5e-3", "--device",
                "cuda" if ctx.cuda else "cpu", "--overwrite", "--quiet"]
        started = time.perf_counter()
        code = train_cli.run(parser.parse_args(args))
        summary = json.loads((out / "training_summary.json").read_text())
        engine = make_engine(ctx, model_dir, quantization, slots=2)
        engine.register_adapter(method, str(out))
        prompt = engine.tokenizer.encode("Q: Where do fish live?\nA:")
        served = generate(engine, {"q": (prompt, method)}, s.new_tokens)["q"][0]
        release(engine)
        model = load_peft(ctx, model_dir, out, quantization)
        peft_tokens, _ = greedy_decode(model, prompt, s.new_tokens, None)
        del model
        rate, first = agreement(served, peft_tokens)
        falls = summary["train_loss_last"] < summary["train_loss_first"]
        result[method] = dict(exit_code=code, steps=summary["steps"], loss_first=summary["train_loss_first"],
                              loss_last=summary["train_loss_last"], loss_falls=falls, train_s=summary["seconds"],
                              served_tokens=len(served), token_agreement_vs_peft=rate, first_diff_vs_peft=first,
                              seconds=time.perf_counter() - started)
        result["ok"] = result["ok"] and code == 0 and falls and len(served) == s.new_tokens
    return result


# ----------------------------------------------------------------------------- driver
SECTIONS = (("kernels", section_kernels), ("attention", section_attention), ("engine", section_engine),
            ("nf4", section_nf4),
            ("decode", section_decode), ("load", section_load), ("train", section_train))


def environment(ctx: Context) -> dict:
    import transformers
    import triton

    info = dict(smoke=ctx.smoke, device=str(ctx.device), dtype=ctx.dtype, python=sys.version.split()[0],
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    try:
        import bitsandbytes
        import peft

        info.update(peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError as error:
        info["missing"] = str(error)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count)
    return info


def run_section(run, ctx: Context) -> dict:
    """The section's result with its status and seconds; an exception is recorded with its traceback."""
    started = time.monotonic()
    try:
        result = run(ctx)
        result["status"] = "ok" if result.get("ok", True) else "failed"
    except Exception:  # noqa: BLE001 - recorded, and the next section runs
        result = dict(status="error", traceback=traceback.format_exc())
    result["seconds"] = time.monotonic() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32, Triton interpreter")
    parser.add_argument("--json", type=Path, help="result file (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds; sections not started by then are skipped (default 450)")
    parser.add_argument("--workdir", type=Path, help="keep models and adapters here (default: a temporary directory)")
    args = parser.parse_args()
    started = time.monotonic()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
        return 2
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    only = set(args.only.split(",")) if args.only else {name for name, _ in SECTIONS}
    unknown = only - {name for name, _ in SECTIONS}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {[name for name, _ in SECTIONS]}")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: a second thread only adds stalls on a shared machine

    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(device=torch.device("cpu" if args.smoke else "cuda:0"),
                      dtype="float32" if args.smoke else "bfloat16",
                      sizes=SMOKE_SIZES if args.smoke else GPU_SIZES, work=work, smoke=args.smoke)
        report: dict = dict(sections={})

        def save() -> None:
            report["seconds"] = time.monotonic() - started
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=1, default=str) + "\n")

        report["sections"]["preflight"] = run_section(section_preflight, ctx)
        save()  # before anything imports transformers or launches a kernel
        report["environment"] = environment(ctx)
        save()
        for name, run in SECTIONS:
            if name not in only:
                continue
            elapsed = time.monotonic() - started
            if elapsed > args.budget:
                report["sections"][name] = dict(status=f"skipped: budget ({elapsed:.0f} s of {args.budget:.0f} s spent)")
                save()
                continue
            print(f"[{elapsed:6.1f}s] {name} ...", file=sys.stderr, flush=True)
            result = run_section(run, ctx)
            report["sections"][name] = result
            print(f"[{time.monotonic() - started:6.1f}s] {name}: {result['status']}", file=sys.stderr, flush=True)
            if ctx.cuda:
                torch.cuda.empty_cache()
            save()
    print(json.dumps({name: {key: value for key, value in section.items() if not isinstance(value, (dict, list))}
                      for name, section in report["sections"].items()}, indent=1, default=str))
    return 0 if all(section["status"] == "ok" for section in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
