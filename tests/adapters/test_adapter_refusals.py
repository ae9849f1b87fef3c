"""Adapters that cannot be served exactly are refused at registration, with a message naming the cause,
and the refusal leaves the registry as it was."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.errors import NotFound
from tests.adapters.broken import assert_refused, copy_adapter, edit_config
from tests.engine_support import make_lora_adapter


def test_wrong_shapes(engine, good, tmp_path):
    path = copy_adapter(good, tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.randn(4, 100)
    save_file(tensors, path / "adapter_model.safetensors")
    assert_refused(engine, path, r"q_proj has lora_A \(4, 100\).*maps 256 -> 256 features")


def test_unknown_module(engine, demo_model_dir, tmp_path):
    path = make_lora_adapter(demo_model_dir, tmp_path / "head", seed=2, r=4, target_modules=["lm_head"])
    assert_refused(engine, path, "targets lm_head, which is not a linear projection of this base model's decoder layers")


def test_rank_above_max_rank(engine, demo_model_dir, tmp_path):
    path = make_lora_adapter(demo_model_dir, tmp_path / "big", seed=3, r=32, target_modules=["q_proj"])
    assert_refused(engine, path, "has rank 32, above the server's max_rank 16")


def test_modules_to_save(engine, demo_model_dir, tmp_path):
    path = make_lora_adapter(demo_model_dir, tmp_path / "mts", seed=4, r=4, target_modules=["q_proj"],
                             modules_to_save=["lm_head"])
    assert_refused(engine, path, "modules_to_save")


def test_pickled_weights(engine, good, tmp_path):
    path = copy_adapter(good, tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    assert_refused(engine, path, "pickled adapter_model.bin")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_weight_rewriting_init(engine, good, tmp_path, init):
    path = copy_adapter(good, tmp_path)
    edit_config(path, init_lora_weights=init)
    assert_refused(engine, path, f"init_lora_weights='{init}', which rewrites the base weights")


def test_other_unsupported_options(engine, good, tmp_path):
    for name, change, match in [
        ("bias", {"lora_bias": True}, "lora_bias"),
        ("trainable-tokens", {"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ("replication", {"layer_replication": [[0, 2]]}, "layer_replication"),
    ]:
        path = copy_adapter(good, tmp_path, name)
        edit_config(path, **change)
        assert_refused(engine, path, match)


def test_not_an_adapter_directory(engine, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(engine, tmp_path / "empty", "no adapter_config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    assert_refused(engine, broken, "not valid JSON")
    with pytest.raises(NotFound, match="is not a directory"):
        engine.register_adapter("missing", str(tmp_path / "missing"))


def test_a_good_adapter_still_registers_after_the_refusals(engine, good):
    info = engine.register_adapter("good", str(good))
    assert info.peft_type == "LORA" and info.max_rank == 4 and info.target_modules == ["q_proj", "v_proj"]
    assert info.size_bytes > 0


@pytest.mark.parametrize("read_whole", [True, False])
def test_unreadable_weights_file(engine, good, tmp_path, monkeypatch, read_whole):
    """A truncated safetensors file is refused, whether it is read whole (small files) or mapped."""
    from loraplex.server.adapters import loader as adapter_loader

    monkeypatch.setattr(adapter_loader, "READ_WHOLE_BYTES", 64 << 20 if read_whole else 0)
    path = copy_adapter(good, tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_refused(engine, path, "adapter_model.safetensors cannot be read")


@pytest.mark.parametrize("read_whole", [True, False])
def test_both_ways_of_reading_give_the_same_tensors(good, monkeypatch, read_whole):
    from loraplex.server.adapters import loader as adapter_loader

    monkeypatch.setattr(adapter_loader, "READ_WHOLE_BYTES", 64 << 20 if read_whole else 0)
    tensors = adapter_loader.read_tensors(good, allow_pickle=False)
    expected = load_file(good / "adapter_model.safetensors")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
