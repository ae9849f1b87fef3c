"""Reference greedy decoding: recompute the whole sequence through the model's forward each step.

Slow (quadratic) and meant as an oracle for tests and checks, not for serving. It works the same for
every adapter type, where `generate` does not: peft 0.21.2's `generate` with transformers 5.x drops
prefix-tuning prefixes and drifts for prompt/P-tuning. No KV cache is kept between steps, so the
prefix and virtual tokens are applied afresh on every forward, as in training.
"""

from __future__ import annotations

from typing import Any

from loraplex.server.train.data import encode_prompt


def greedy_decode(model: Any, input_ids: list[int], max_new_tokens: int,
                  eos_token_id: int | None) -> tuple[list[int], list[float]]:
    """New token ids (argmax at each step, ending with EOS if it was produced) and their logprobs.

    Puts `model` in eval mode.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    sequence = list(input_ids)
    tokens: list[int] = []
    logprobs: list[float] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([sequence], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            sequence.append(token)
            if token == eos_token_id:
                break
    return tokens, logprobs


def greedy_complete(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> tuple[str, bool]:
    """(completion text without the EOS, whether the model stopped with EOS) for `prompt`."""
    eos = tokenizer.eos_token_id
    new, _ = greedy_decode(model, encode_prompt(tokenizer, prompt), max_new_tokens, eos)
    stopped = bool(new) and new[-1] == eos
    if stopped:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False), stopped
