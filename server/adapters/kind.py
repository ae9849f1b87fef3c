"""How the server applies an adapter: the PEFT types reduce to five ways of changing a step."""

from __future__ import annotations

import enum


class AdapterKind(str, enum.Enum):
    LORA = "lora"  # LoRA, QLoRA, rsLoRA, AdaLoRA: y += s·B·A·x on the targeted projections
    DORA = "dora"  # LoRA, then the projection's output rows rescaled by the magnitude vector
    IA3 = "ia3"  # per-projection input or output scale vectors
    PROMPT = "prompt"  # prompt tuning, P-tuning: virtual input embeddings before the prompt
    PREFIX = "prefix"  # prefix tuning: virtual keys and values in every layer's KV cache
