"""A lean forward pass for Llama-shaped decoders (Llama, Mistral, Qwen2, Qwen3), used by the model
runner in place of the transformers model's own forward.

It runs the same layers with the same math: the embedding, per layer RMSNorm -> q/k/v projections
(Qwen3: per-head RMSNorm of q and k) -> rotary embedding -> paged attention (`attention.store_kv`,
`attention.attend`) -> o_proj -> residual add -> RMSNorm -> gate/up -> act(gate) * up -> down_proj ->
residual add, the final norm and the LM head on the kept rows only. The projections and norms are the
model's own modules (the projections our `LoRALinear`s, over fused or 4-bit/8-bit base layers), so every
adapter type is served as through the transformers forward; what goes away is the framework around the
math: per-module calls, keyword plumbing, output containers, and the split of a fused group's output into
three transposed views that are put back together for the cache.

Why: that glue and the small operations of the norms, the rotary embedding, the cache writes and the
MLP's activation are a large part of a small decode step (docs/benchmarks.md). Those element-wise steps
are the kernel backend's (`kernels/backend.py`: `add_rms_norm`, `rope_store`; torch's formulas, or one
fused kernel each where the platform has one).

`DecoderForward.create(model, backend)` returns None for anything it does not recognise (other model classes,
or modules that are not the standard ones), and the runner keeps the transformers forward.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.kernels.backend import Backend
from loraplex.server.model import attention

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""Model classes whose decoder layers are the standard pre-norm Llama layer (checked again per module)."""
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class _Layer:
    __slots__ = ("attn", "index", "q", "k", "v", "o", "gate", "up", "down", "act", "norm1", "norm2", "q_norm",
                 "k_norm", "heads", "kv_heads", "head_dim", "scaling", "window")

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.index = attn.layer_idx
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.head_dim = attn.head_dim
        self.heads = self.q.out_features // attn.head_dim
        self.kv_heads = self.k.out_features // attn.head_dim
        self.scaling = attn.scaling
        self.window = attention.layer_window(attn)


class DecoderForward:
    """Runs a supported model's forward for one engine step (see the module doc)."""

    def __init__(self, model: nn.Module, backend: Backend):
        self.backend = backend
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers]

    @classmethod
    def create(cls, model: nn.Module, backend: Backend) -> DecoderForward | None:
        """The lean forward for `model`, or None when it is not a model this module knows."""
        if type(model).__name__ not in SUPPORTED:
            return None
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
            return None
        if type(inner.norm).__name__ not in _NORMS:
            return None
        for layer in inner.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or type(mlp).__name__ not in _MLPS:
                return None
            if any(type(getattr(layer, name, None)).__name__ not in _NORMS
                   for name in ("input_layernorm", "post_attention_layernorm")):
                return None
            if not all(hasattr(attn, name)
                       for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")):
                return None
        return cls(model, backend)

    def __call__(self, position_ids: torch.Tensor, keep_index: torch.Tensor, meta: attention.AttentionMeta,
                 input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(keep_index), vocab] of the kept rows. input_ids [1, T] or inputs_embeds [1, T, hidden].

        Each layer's residual add is folded into the next norm (`Backend.add_rms_norm`, which may update
        h in place)."""
        h = self.embed(input_ids)[0] if inputs_embeds is None else inputs_embeds[0].clone()  # [T, hidden], ours
        cos, sin = self.rotary(h[None], position_ids)
        cos, sin = cos[0], sin[0]  # [T, D]
        ops = self.backend
        T = h.shape[0]
        delta = None
        for layer in self.layers:
            h, x = ops.add_rms_norm(h, delta, layer.norm1)
            q, k, v = self._qkv(layer, x)
            q, k = ops.rope_store(q, k, v, cos, sin, meta.cache.k[layer.index], meta.cache.v[layer.index],
                                  meta.slot_mapping)
            out = attention.attend(layer.attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                   v.transpose(0, 1)[None], meta, layer.scaling, layer.window)
            h, x = ops.add_rms_norm(h, layer.o(out.view(T, -1)), layer.norm2)
            gate, up = layer.gate(x), layer.up(x)
            delta = layer.down(layer.act(gate) * up)
        h.add_(delta)
        return self.lm_head(self.norm(h.index_select(0, keep_index)))

    @staticmethod
    def _qkv(layer: _Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's queries [T, H, D] and keys/values [T, KVH, D] (Qwen3: q and k normed per head)."""
        T = x.shape[0]
        q = layer.q(x).view(T, layer.heads, layer.head_dim)
        k = layer.k(x).view(T, layer.kv_heads, layer.head_dim)
        v = layer.v(x).view(T, layer.kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        return q, k, v
