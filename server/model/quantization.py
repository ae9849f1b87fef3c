"""bitsandbytes quantization of the base model, as the server, the trainer and the tests load it."""

from __future__ import annotations

import logging
from typing import Any

from loraplex.server.config import INT8_THRESHOLD

# bitsandbytes warns at import, on AVX512-BF16 CPUs, that the optional `kernels` package for its packed
# 4-bit CPU path is missing; loraplex keeps 4-bit layers off that path (below), so it is not news.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb_config(quantization: str, compute_dtype: Any, int8_threshold: float = INT8_THRESHOLD):
    """The `BitsAndBytesConfig` for "nf4" (4-bit NormalFloat with double quant, as QLoRA) or "int8"
    (LLM.int8 with outlier threshold `int8_threshold`; 0, the default, is batch-invariant)."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold)
    raise ValueError(f"unknown quantization {quantization!r}")


def keep_bnb_off_packed_cpu_path(model: Any) -> None:
    """Keep bitsandbytes' 4-bit layers on its generic path on CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights the first time a layer runs in
    eval mode without grad, and keeps them packed. That kernel multiplies in bfloat16 whatever the
    compute dtype (a float32 server would round every projection's input to bfloat16, and disagree
    with itself across batch layouts), has no autograd (training steps after an eval pass would
    backpropagate through it wrongly), and fails unless out_features % 32 == 0.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantized_weight(module: Any) -> Any:
    """A linear layer's weight [out, in], dequantized if bitsandbytes quantized it; the layer still runs after.

    peft's `dequantize_module_weight` gives the same values, but on an 8-bit layer it also replaces the
    weight by a copy without its scales, and every later forward of a layer that already ran fails.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        return dequantize_bnb_weight(weight, getattr(module, "state", None))
    return weight
