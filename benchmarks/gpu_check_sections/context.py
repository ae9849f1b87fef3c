"""What every section is given: the device, dtype and sizes of the run, and the bounds they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Largest |logprob(engine) - logprob(peft)| of the engine's own tokens accepted in bfloat16 (NF4 too:
# both sides dequantize the same 4-bit weights); float32 (--smoke) agrees to FLOAT32_LOGPROB_TOL.
BF16_LOGPROB_TOL = 0.1
FLOAT32_LOGPROB_TOL = 1e-3
NEEDS_CUDA = "skipped: needs CUDA"


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
