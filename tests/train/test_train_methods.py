"""Every method: training lowers the loss, and the saved adapter loads with PeftModel.from_pretrained,
changes the base model's output, and reproduces the trained model's loss exactly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from loraplex.server.model.quantization import bnb_config

from loraplex.server.train import METHODS, TrainConfig, train
from loraplex.server.train.data import encode, load_examples
from loraplex.server.train.trainer import SUMMARY_FILE, evaluate_loss

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PEFT_TYPE = {
    "lora": "LORA",
    "qlora": "LORA",
    "dora": "LORA",
    "adalora": "ADALORA",
    "ia3": "IA3",
    "prefix": "PREFIX_TUNING",
    "prompt": "PROMPT_TUNING",
    "p-tuning": "P_TUNING",
}


def load_base(model_dir, method):
    from transformers import AutoModelForCausalLM

    if method != "qlora":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config("nf4", torch.float32),
                                                device_map={"": "cpu"})


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss_and_adapter_loads(method, demo_model_dir, shared_pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = tmp_path / "adapter"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(
            TrainConfig(
                model=demo_model_dir,
                method=method,
                data=shared_pairs_file,
                eval_data=shared_pairs_file,  # evaluated before training too, in eval mode
                out=out,
                max_steps=15,
                batch_size=4,
                quiet=True,
            )
        )
    # bitsandbytes' packed CPU kernel (chosen in eval mode) has no autograd; training must not use it.
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]

    assert summary.steps == 15 and summary.epochs == 15
    # With the default learning rates every method gains 0.75 nats or more in these 15 steps.
    assert summary.eval_loss < summary.eval_loss_initial - 0.3, summary
    assert summary.train_loss_last < summary.train_loss_first - 0.3, summary
    assert 0 < summary.trainable_params < summary.total_params
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", SUMMARY_FILE]
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary.to_dict()

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == PEFT_TYPE[method]
    assert adapter_config.get("use_dora", False) == (method == "dora")
    if method in ("lora", "qlora", "dora", "adalora", "ia3"):
        assert set(adapter_config["target_modules"]) == LLAMA_LINEARS
    if method == "ia3":
        assert adapter_config["feedforward_modules"] == ["down_proj"]
    if method == "adalora":
        # update_and_allocate ran: the rank budget was cut from init_r=12 to target_r=8 per module.
        assert adapter_config["total_step"] == 15
        kept = adapter_config["rank_pattern"]
        assert len(kept) == 4 * len(LLAMA_LINEARS) and sum(map(sum, kept.values())) == 8 * len(kept)

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    prompt = torch.tensor([tokenizer("Q: Where do fish live?\nA:")["input_ids"]])
    base = load_base(demo_model_dir, method).eval()
    with torch.no_grad():
        base_logits = base(input_ids=prompt).logits
    adapted = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        adapted_logits = adapted(input_ids=prompt).logits[:, -prompt.shape[1] :]
    assert (adapted_logits - base_logits).abs().max() > 1e-2

    # The files hold exactly what was trained: the loaded adapter's loss is the summary's.
    eval_set = encode(load_examples(shared_pairs_file), tokenizer, 512)
    reloaded_loss = evaluate_loss(adapted, eval_set, 4, tokenizer.pad_token_id, torch.device("cpu"))
    # (For qlora, a freshly loaded 4-bit base runs bitsandbytes' packed CPU kernel in eval mode, which
    # training keeps off; the two agree to about 5e-5.)
    assert reloaded_loss == pytest.approx(summary.eval_loss, rel=1e-3 if method == "qlora" else 1e-4)
