"""Adapters peft itself refuses (or would load differently) are refused at registration, naming the field
or tensor; malformed files end in FAILED_PRECONDITION, never in a Python exception of another kind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.adapters.broken import assert_refused, edit_config, edit_tensors
from tests.engine_support import run_until_done, submit

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("field, value, match", [
    ("r", 0, r"r is 0, but it must be a positive integer"),
    ("r", -4, r"r is -4, but it must be a positive integer"),
    ("r", "4", r"r is '4', but it must be a positive integer"),
    ("r", None, r"r is None"),
    ("r", True, r"r is True"),
    ("lora_alpha", float("nan"), r"lora_alpha is nan, but it must be a finite number"),
    ("lora_alpha", "16", r"lora_alpha is '16'"),
    ("lora_dropout", 1.5, r"lora_dropout is 1.5, but it must be a number in \[0, 1\]"),
    ("use_rslora", "yes", r"use_rslora is 'yes', but it must be true or false"),
    ("target_modules", 7, r"target_modules is 7"),
    ("target_modules", "(", r"target_modules holds '\(', not a valid regex"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] is 0"),
    ("rank_pattern", {"(": 4}, r"rank_pattern holds '\(', not a valid regex"),
    ("alpha_pattern", {"(?i)q_proj": 4}, r"alpha_pattern holds '\(\?i\)q_proj', not a valid regex"),
    ("alpha_pattern", {"q_proj": float("inf")}, r"alpha_pattern\['q_proj'\] is inf"),
    ("layers_to_transform", [9], r"layers_to_transform is \[9\], but it must be .* in \[0, 4\)"),
    ("layers_pattern", "(?P<idx>x)", r"layers_pattern holds"),
    ("peft_type", ["LORA"], r"peft_type is \['LORA'\], not a string"),
    ("task_type", 3, r"has task_type 3; only CAUSAL_LM is served"),
])
def test_config_fields_are_type_and_range_checked(engine, copy, field, value, match):
    edit_config(copy, **{field: value})
    assert_refused(engine, copy, match)


def test_target_modules_not_in_the_base_model(engine, copy):
    """The tensors fit q_proj and v_proj, but peft would find no `foo_proj` and refuse the adapter."""
    edit_config(copy, target_modules=["foo_proj"])
    assert_refused(engine, copy, r"target_modules \['foo_proj'\] not found in the base model")


def test_weights_of_modules_the_config_leaves_out(engine, copy):
    edit_config(copy, target_modules=["q_proj"])
    assert_refused(engine, copy, r"holds weights for model.layers.0.self_attn.v_proj, which its target_modules")
    edit_config(copy, target_modules=["q_proj", "v_proj"], layers_to_transform=[0])
    assert_refused(engine, copy, r"holds weights for model.layers.1.self_attn.q_proj")


def test_rank_zeroedit_tensors(engine, copy):
    edit_tensors(copy, **{Q_A: torch.zeros(0, 256), Q_B: torch.zeros(256, 0)})
    assert_refused(engine, copy, r"q_proj has lora_A of rank 0, but its config gives rank 4")


def test_rank_against_rank_pattern(engine, copy):
    edit_config(copy, rank_pattern={"layers.0.self_attn.q_proj": 2})
    assert_refused(engine, copy, r"layers.0.self_attn.q_proj has lora_A of rank 4, but its config gives rank 2")


@pytest.mark.parametrize("tensor, match", [
    (torch.full((4, 256), float("nan")), "holds NaN or infinite values"),
    (torch.full((4, 256), float("inf")), "holds NaN or infinite values"),
    (torch.ones(4, 256, dtype=torch.int32), "has dtype torch.int32"),
    (torch.ones(4, 256, dtype=torch.bool), "has dtype torch.bool"),
    (torch.tensor(1.0), r"has shape \(\), expected 2 dimensions"),
    (torch.ones(4, 256, 1), r"has shape \(4, 256, 1\), expected 2 dimensions"),
])
def test_tensor_dtype_finiteness_and_dimensions(engine, copy, tensor, match):
    edit_tensors(copy, **{Q_A: tensor})
    assert_refused(engine, copy, match)


def test_half_precision_weights_are_served(engine, copy):
    edit_tensors(copy, **{k: v.half() for k, v in load_file(copy / "adapter_model.safetensors").items()})
    assert engine.register_adapter("half", str(copy)).max_rank == 4
    engine.unregister_adapter("half")


def test_bounded_config_parsing(engine, copy):
    path = copy / "adapter_config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(engine, copy, "nested deeper than 16 levels")
    path.write_text(json.dumps({"peft_type": "LORA", "x": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}))
    assert_refused(engine, copy, "nested deeper than 16 levels")
    path.write_text(json.dumps({"peft_type": "LORA", "pad": "x" * (2 << 20)}))
    assert_refused(engine, copy, r"is larger than 1048576 bytes")
    path.write_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}")
    assert_refused(engine, copy, "not valid JSON")
    path.write_bytes(b'{"peft_type": "\xff"}')
    assert_refused(engine, copy, "not valid JSON")


def test_ia3_orientation_follows_feedforward_modules(engine, tmp_path):
    path = tmp_path / "ia3"
    path.mkdir()
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "down_proj"],
              "feedforward_modules": ["down_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    layer = "base_model.model.model.layers.{}.{}.ia3_l"
    tensors = {}
    for i in range(4):
        tensors[layer.format(i, "self_attn.k_proj")] = torch.ones(128, 1)
        tensors[layer.format(i, "mlp.down_proj")] = torch.ones(1, 704)
    save_file(tensors, path / "adapter_model.safetensors")
    assert engine.register_adapter("ia3", str(path)).peft_type == "IA3"
    engine.unregister_adapter("ia3")
    (path / "adapter_config.json").write_text(json.dumps({**config, "feedforward_modules": ["k_proj"]}))
    assert_refused(engine, path, r"layers.0.mlp.down_proj has ia3_l \(1, 704\), but feedforward_modules makes it \[256, 1\]")


def test_virtual_token_count(engine, tmp_path):
    path = tmp_path / "prompt"
    path.mkdir()
    save_file({"prompt_embeddings": torch.zeros(3, 256)}, path / "adapter_model.safetensors")
    for count, match in [(0, "num_virtual_tokens is 0"), ("3", "num_virtual_tokens is '3'"),
                         (None, "num_virtual_tokens is None")]:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING",
                                                              "num_virtual_tokens": count}))
        assert_refused(engine, path, match)


def test_malformed_pickle(engine, copy):
    from loraplex.server.adapters.loader import load_adapter

    (copy / "adapter_model.safetensors").unlink()
    (copy / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(FailedPrecondition, match="adapter_model.bin cannot be read"):
        load_adapter(copy, engine.runner.base_spec, 16, allow_pickle=True)
    torch.save([torch.ones(2)], copy / "adapter_model.bin")
    with pytest.raises(FailedPrecondition, match="holds no named tensors"):
        load_adapter(copy, engine.runner.base_spec, 16, allow_pickle=True)


@pytest.fixture(scope="module")
def registered(engine, good):
    engine.register_adapter("ok", str(good))
    yield "ok"
    engine.unregister_adapter("ok")


@pytest.mark.parametrize("adapter_id", ["../x", "a/b", "é", "_base", "x" * 129])
def test_malformed_adapter_id_in_a_request(engine, registered, adapter_id):
    """Ids follow the registration rules everywhere; malformed ones are not looked up."""
    with pytest.raises(InvalidArgument, match="adapter id .* is invalid"):
        submit(engine, "bad", "hi", adapter=adapter_id)
    with pytest.raises(InvalidArgument, match="adapter id .* is invalid"):
        engine.get_adapter(adapter_id)
    with pytest.raises(InvalidArgument, match="adapter id .* is invalid"):
        engine.unregister_adapter(adapter_id)
    with pytest.raises(NotFound):
        submit(engine, "unknown", "hi", adapter="unknown")
    collected = submit(engine, "ok", "hi", adapter=registered, max_new_tokens=2)
    run_until_done(engine)
    assert collected.final.finish_reason in ("length", "eos")


def test_an_unusable_source_path(engine):
    with pytest.raises(InvalidArgument, match="is not a usable path: embedded null byte"):
        engine.register_adapter("path", "\x00")
    # refused when the path is resolved or when it is read, depending on where the OS notices
    with pytest.raises((InvalidArgument, FailedPrecondition), match="File name too long"):
        engine.register_adapter("path", "a" * 300)
