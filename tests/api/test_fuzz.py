"""Fuzz the API with a seeded mutation loop: mutated adapter directories (config values and types, tensor
shapes, dtypes and values, truncated files, broken safetensors headers) and mutated requests (every field
of GenerateRequest). Every outcome is OK or a status docs/api.md documents for a refusal, never UNKNOWN or
INTERNAL, and a good adapter's greedy tokens are the same afterwards.

The default run does FUZZ_CASES cases of each kind; `-m slow` runs SLOW_CASES with other seeds. A failure
prints the seed and case number, which replay it alone (`LORAPLEX_FUZZ_SEED`, `LORAPLEX_FUZZ_CASES`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.clients import Client, LoraplexError
from loraplex.server.api.config import ServerConfig
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc
from tests.api.helpers import ServerThread, engine_config, wait_idle
from tests.api.test_docs import documented_refusal_statuses
from tests.engine_support import make_lora_adapter

FUZZ_CASES = int(os.environ.get("LORAPLEX_FUZZ_CASES", 150))
SLOW_CASES = 2000
SEED = int(os.environ.get("LORAPLEX_FUZZ_SEED", 15))
PROMPTS = ["Q: Where do fish live?\nA:", "The sea"]

CONFIG_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
               "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "layers_to_transform", "layers_pattern",
               "init_lora_weights", "modules_to_save", "init_r", "target_r", "feedforward_modules",
               "num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim",
               "num_transformer_submodules", "lora_bias", "fan_in_fan_out"]
VALUES = [0, 1, -1, 2, 4, 8, 1000, 2**31, 2**70, 0.5, -0.5, 1.5, float("nan"), float("inf"), float("-inf"), 1e308,
          "", "x", "LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "ADALORA", "CAUSAL_LM", "all-linear", "(", ".*",
          "q_proj", "(?i)q", None, True, False, [], {}, [0], [0, 1], [99], [-1], ["q_proj"], ["foo"], ["q_proj", 3],
          {"q_proj": 0}, {"q_proj": 2}, {"q_proj": "x"}, {"(": 1}, {"q_proj": float("nan")}, [[[[1]]]],
          {"a": {"b": {"c": {}}}}, "é" * 50]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
          torch.float8_e4m3fn]
SIZES = [0, 1, 2, 3, 4, 64, 128, 256, 704, 1024]


def _write_synthetic(root: Path) -> dict[str, Path]:
    """Valid IA3, prompt-tuning and prefix-tuning adapters for the demo model, written directly."""
    layer = "base_model.model.model.layers.{}.{}"
    adapters = {
        "ia3": ({"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "down_proj"],
                 "feedforward_modules": ["down_proj"]},
                {**{layer.format(i, "self_attn.k_proj.ia3_l"): 1 + 0.1 * torch.randn(128, 1) for i in range(4)},
                 **{layer.format(i, "mlp.down_proj.ia3_l"): 1 + 0.1 * torch.randn(1, 704) for i in range(4)}}),
        "prompt": ({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 256,
                    "num_transformer_submodules": 1}, {"prompt_embeddings": torch.randn(3, 256)}),
        "prefix": ({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_layers": 4,
                    "num_attention_heads": 2, "token_dim": 256, "num_transformer_submodules": 1},
                   {"prompt_embeddings": torch.randn(3, 4 * 2 * 2 * 64)}),
    }
    paths = {}
    for name, (config, tensors) in adapters.items():
        path = root / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, path / "adapter_model.safetensors")
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def setup(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-adapters")
    torch.manual_seed(0)
    good = {"lora": make_lora_adapter(demo_model_dir, root / "lora", seed=1, r=4, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj", "down_proj"]),
            **_write_synthetic(root)}
    config = ServerConfig(engine=engine_config(demo_model_dir, adapter_root=root, max_device_adapters=4),
                          port=0, metrics_port=0, max_queued_requests=64)
    thread = ServerThread(config).start()
    yield thread, root, good
    thread.stop()


def _greedy(client: Client, adapters) -> dict:
    return {(a, p): client.generate(p, adapter=a, max_new_tokens=8, ignore_eos=True).token_ids
            for a in adapters for p in PROMPTS}


# ---------------------------------------------------------------- adapter mutations
def _mutate_config(rng: random.Random, path: Path) -> str:
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    op = rng.randrange(10)
    if op == 0:
        data = {0: b"", 1: b"[" * 50_000, 2: b"{\"peft_type\": \"LORA\"", 3: b"\xff\xfe{}",
                4: json.dumps([config]).encode(), 5: b"null", 6: json.dumps({"peft_type": "LORA", "pad": "x" * (1 << 21)}).encode(),
                7: file.read_bytes()[: rng.randrange(len(file.read_bytes()))]}[rng.randrange(8)]
        file.write_bytes(data)
        return f"config file replaced ({data[:20]!r})"
    if op == 1:
        file.unlink()
        (file).mkdir()
        return "config is a directory"
    changes = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        key = rng.choice(list(config) + CONFIG_KEYS)
        if rng.random() < 0.15:
            config.pop(key, None)
            changes.append(f"del {key}")
        else:
            config[key] = rng.choice(VALUES)
            changes.append(f"{key}={config[key]!r:.40}")
    file.write_text(json.dumps(config))
    return "config " + ", ".join(changes)


def _mutate_tensors(rng: random.Random, path: Path) -> str:
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = rng.choice(sorted(tensors))
    op = rng.randrange(8)
    if op == 0:
        del tensors[key]
        what = f"del {key}"
    elif op == 1:
        tensors[key + rng.choice(["", ".x", "_"]) + "y"] = tensors.pop(key)
        what = f"renamed {key}"
    elif op == 2:
        shape = [rng.choice(SIZES) for _ in range(rng.choice([0, 1, 2, 2, 2, 3]))]
        tensors[key] = torch.randn(shape)
        what = f"{key} shape {shape}"
    elif op == 3:
        dtype = rng.choice(DTYPES)
        tensors[key] = tensors[key].to(dtype)
        what = f"{key} dtype {dtype}"
    elif op == 4:
        value = rng.choice([float("nan"), float("inf"), float("-inf")])
        flat = tensors[key].view(-1)
        flat[rng.randrange(flat.numel())] = value
        what = f"{key} holds {value}"
    elif op == 5:
        scale = rng.choice([0.0, -1.0, 1e3, 1e30])
        tensors[key] = tensors[key] * scale
        what = f"{key} scaled by {scale}"
    elif op == 6:
        tensors[key] = tensors[key].T.contiguous()
        what = f"{key} transposed"
    else:
        tensors[f"base_model.model.model.layers.{rng.choice([0, 3, 4, 99])}.self_attn.o_proj.lora_A.weight"] = \
            torch.randn(4, 256)
        what = "extra tensor"
    save_file(tensors, file)
    return what


def _mutate_file(rng: random.Random, path: Path) -> str:
    file = path / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    op = rng.randrange(6)
    if op == 0:
        cut = rng.randrange(len(data))
        file.write_bytes(data[:cut])
        return f"weights truncated at {cut}"
    if op == 1:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(8 + header_len)] = rng.randrange(256)
        file.write_bytes(data)
        return "header bytes flipped"
    if op == 2:
        data[:8] = struct.pack("<Q", rng.choice([0, 1, header_len + 1, len(data), 2**40, 2**64 - 1]))
        file.write_bytes(data)
        return "header length replaced"
    if op == 3:
        header = json.loads(data[8:8 + header_len])
        key = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[key][field] = rng.choice(["F32", "XX", "I64", [-1], [1, 2**62], [0, 0], [2**40, 2**40 + 4], "", None])
        raw = json.dumps(header).encode()
        file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len:])
        return f"header {key}.{field} changed"
    if op == 4:
        file.unlink()
        return "no weights file"
    torch.save(load_file(file), path / "adapter_model.bin")
    file.unlink()
    return "pickled weights only"


def _mutated_adapter(rng: random.Random, good: dict[str, Path], root: Path, case: int) -> tuple[str, str]:
    kind = rng.choice(sorted(good))
    path = root / "mutants" / f"m{case}"
    shutil.copytree(good[kind], path)
    mutate = rng.choice([_mutate_config, _mutate_config, _mutate_tensors, _mutate_tensors, _mutate_file])
    return f"mutants/m{case}", f"{kind}: {mutate(rng, path)}"


def _adapter_case(client: Client, rng: random.Random, good, root: Path, case: int, allowed: set[str]) -> str:
    source, what = _mutated_adapter(rng, good, root, case)
    adapter_id = f"m{case}"
    try:
        client.register_adapter(adapter_id, source)
    except LoraplexError as error:
        assert error.code.name in allowed, f"case {case} ({what}): {error}"
        return "refused"
    try:  # accepted: it must serve (or be refused with a documented status)
        client.generate(PROMPTS[0], adapter=adapter_id, max_new_tokens=2, ignore_eos=True,
                        temperature=rng.choice([0.0, 1.0]), seed=case)
    except LoraplexError as error:
        assert error.code.name in allowed, f"case {case} ({what}): generation: {error}"
    finally:
        client.unregister_adapter(adapter_id)
    return "accepted"


# ---------------------------------------------------------------- request mutations
STRINGS = ["", "a", "hi", "../x", "a/b", "é", "_base", "lora", "prefix", "m0", "x" * 129, "\x00", "\ud7ff" * 3,
           "Q: What is a ship?\nA:", "日本語のテキスト", "\n" * 40, "x" * 5000]


def _request(rng: random.Random, case: int) -> tuple[pb.GenerateRequest, float]:
    request = pb.GenerateRequest()
    if rng.random() < 0.5:
        request.request_id = rng.choice(STRINGS[:12] + [f"r{case}", "same"])
    if rng.random() < 0.6:
        request.adapter_id = rng.choice(STRINGS[:12] + ["lora", "ia3", "prompt", "prefix"])
    which = rng.random()
    if which < 0.5:
        request.prompt = rng.choice(STRINGS)
    elif which < 0.9:
        ids = [rng.choice([0, 1, 5, 100, 2047, 2048, 4096, 2**32 - 1]) for _ in range(rng.choice([0, 1, 3, 50]))]
        request.prompt_token_ids.ids.extend(ids)
    sampling = request.sampling
    for name, pool in [("temperature", [0.0, 0.5, 1.0, -1.0, 1e30, float("nan"), float("inf")]),
                       ("top_p", [0.0, 0.5, 1.0, 1.5, -0.1, float("nan")]),
                       ("top_k", [0, 1, 5, 2**32 - 1]),
                       ("repetition_penalty", [0.0, 1.0, 1.3, -1.0, float("nan"), float("inf"), 1e-30])]:
        if rng.random() < 0.4:
            setattr(sampling, name, rng.choice(pool))
    if rng.random() < 0.3:
        sampling.seed = rng.choice([0, 1, 2**64 - 1])
    request.max_new_tokens = rng.choice([0, 1, 2, 3, 2**32 - 1])
    if rng.random() < 0.3:
        request.stop.extend(rng.choice(STRINGS) for _ in range(rng.choice([1, 2, 17])))
    request.ignore_eos = rng.random() < 0.5
    request.return_logprobs = rng.random() < 0.5
    long_running = request.max_new_tokens > 3 or request.max_new_tokens == 0
    return request, (0.3 if long_running else 20.0)


def _request_case(stub_pair, rng_seed: int, case: int, allowed: set[str]) -> str:
    rng = random.Random(rng_seed)
    request, timeout = _request(rng, case)
    generate, stream = stub_pair
    try:
        if rng.random() < 0.5:
            generate(request, timeout=timeout)
        else:
            for _ in stream(request, timeout=timeout):
                pass
    except grpc.RpcError as error:
        assert error.code().name in allowed | {"DEADLINE_EXCEEDED"}, f"case {case} ({request}): {error}"
        return error.code().name
    return "OK"


SOURCES = ["lora", "ia3", "prompt/", "lora/../prefix", "lora/adapter_config.json", "mutants", "..", "../x", "/",
           "/etc", "/dev/zero", "/proc/self", "", "\x00", "a" * 300, "a/" * 3000, "é", "~"]


def _admin_case(stub, rng: random.Random, case: int, allowed: set[str]) -> str:
    """Register, get or unregister with fuzzed fields (never unregistering the good adapters)."""
    adapter_id = rng.choice(STRINGS[:12] + [f"f{case}", "f"])
    try:
        op = rng.randrange(3)
        if op == 0:
            request = pb.RegisterAdapterRequest(adapter_id=adapter_id, source=rng.choice(SOURCES),
                                                pin=rng.random() < 0.5, preload=rng.random() < 0.5)
            stub.RegisterAdapter(request, timeout=60)
            stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=60)
        elif op == 1:
            stub.GetAdapter(pb.GetAdapterRequest(adapter_id=rng.choice([adapter_id, "lora"])), timeout=60)
        else:
            stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=60)
    except grpc.RpcError as error:
        assert error.code().name in allowed, f"case {case} (adapter call {op}, {adapter_id!r}): {error}"
        return error.code().name
    return "OK"


def _fuzz(setup, cases: int, seed: int) -> None:
    thread, root, good = setup
    allowed = documented_refusal_statuses() - {"INTERNAL", "UNKNOWN"}
    (root / "mutants").mkdir(exist_ok=True)
    with Client(thread.address, timeout=60) as client:
        for name, path in good.items():
            client.register_adapter(name, name)
        before = _greedy(client, [None, *good])
        rng = random.Random(seed)
        outcomes = [_adapter_case(client, rng, good, root, case, allowed) for case in range(cases)]
        assert 0 < outcomes.count("accepted") < cases, "the mutations no longer reach both outcomes"
        with grpc.insecure_channel(thread.address) as channel:
            admin = pb_grpc.AdaptersStub(channel)
            admin_codes = [_admin_case(admin, rng, case, allowed) for case in range(cases // 3)]
            assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED"} <= set(admin_codes)
            stub = pb_grpc.GeneratorStub(channel)
            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda case: _request_case((stub.Generate, stub.GenerateStream),
                                                                 seed * 100_003 + case, case, allowed), range(cases)))
        assert "OK" in codes and "INVALID_ARGUMENT" in codes
        wait_idle(client)  # requests cut by their deadline may still be closing in the engine
        print(f"fuzz seed {seed}: adapters {dict(Counter(outcomes))}, adapter calls {dict(Counter(admin_codes))}, "
              f"requests {dict(Counter(codes))}")
        assert _greedy(client, [None, *good]) == before
        for name in good:
            client.unregister_adapter(name)
    shutil.rmtree(root / "mutants")


def test_fuzz_adapters_and_requests(setup):
    _fuzz(setup, FUZZ_CASES, SEED)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_longer(setup, seed):
    _fuzz(setup, SLOW_CASES, seed)
