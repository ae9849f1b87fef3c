"""After a short run on a handful of prompt/completion pairs, the adapter answers each training prompt
with its completion (and stops there), and the base model does not.

Greedy decoding recomputes the whole sequence through PeftModel's forward at every step
(`greedy_complete`): peft 0.21.2's `generate` drops prefix-tuning prefixes with transformers 5.x.
"""

from __future__ import annotations

import pytest

from loraplex.server.train import TrainConfig, train
from loraplex.server.train.greedy import greedy_complete

from .conftest import PAIRS
from .test_train_methods import load_base

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

# Learning rates above the defaults, so that a short run suffices on the random-weight demo model.
# Step counts keep a margin: measured, every pair was right from 30 (lora), 40 (qlora) and 100
# (prefix) steps, and prefix still missed one at 80.
RUNS = {
    "lora": {"lr": 5e-3, "max_steps": 60, "dropout": 0.0},
    "qlora": {"lr": 5e-3, "max_steps": 60, "dropout": 0.0},
    "prefix": {"lr": 5e-2, "max_steps": 130},
}


@pytest.mark.parametrize("method", list(RUNS))
def test_adapter_completes_training_prompts(method, demo_model_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = tmp_path / "adapter"
    config = TrainConfig(model=demo_model_dir, method=method, data=pairs_file, out=out, batch_size=4, quiet=True, **RUNS[method])
    train(config)

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    base = load_base(demo_model_dir, method)
    # One token more than the completion and its EOS would take: enough to tell "not the completion".
    base_answers = [
        greedy_complete(base, tokenizer, pair["prompt"], len(tokenizer(pair["completion"])["input_ids"]) + 2)
        for pair in PAIRS
    ]
    adapted = PeftModel.from_pretrained(base, out)
    answers = [greedy_complete(adapted, tokenizer, pair["prompt"], max_new_tokens=40) for pair in PAIRS]

    assert answers == [(pair["completion"], True) for pair in PAIRS]
    assert all(answer != (pair["completion"], True) for pair, answer in zip(PAIRS, base_answers))
