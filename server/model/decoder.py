"""A lean forward pass for Llama-shaped decoders (Llama, Mistral, Qwen2, Qwen3), used by the model
runner in place of the transformers model's own forward.

It runs the same layers with the same math: the embedding, per layer RMSNorm -> q/k/v projections
(Qwen3: per-head RMSNorm of q and k) -> rotary embedding -> paged attention (`attention.store_kv`,
`attention.attend`) -> o_proj -> residual add -> RMSNorm -> gate/up -> act(gate) * up -> down_proj ->
residual add, the final norm and the LM head on the kept rows only. The projections and norms are the
model's own modules (the projections our `LoRALinear`s, over plain, packed or 4-bit/8-bit base
layers), so every adapter type is served as through the transformers forward; what goes away is the
framework around the math: per-module calls, keyword plumbing, output containers, and the split of a
fused group's output into three transposed views that are put back together for the cache.

Why: on CPU that glue and the small torch operations of the norms, the rotary embedding, the cache
writes and the MLP's activation are a large part of a small decode step (docs/benchmarks.md). On CPU float32 those steps run in C here
(`native.add_rms_norm`, `rope_store`, `silu_mul`); elsewhere the model's norm modules and the
transformers formulas.

`DecoderForward.create(model)` returns None for anything it does not recognise (other model classes,
or modules that are not the standard ones), and the runner keeps the transformers forward.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.kernels import native
from loraplex.server.model import attention

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""Model classes whose decoder layers are the standard pre-norm Llama layer (checked again per module)."""
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position: x·cos + rotate_half(x)·sin (cos, sin [T, 1, D])."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Layer:
    __slots__ = ("attn", "index", "q", "k", "v", "o", "gate", "up", "down", "act", "silu", "norm1", "norm2", "q_norm",
                 "k_norm", "heads", "kv_heads", "head_dim", "scaling", "window")

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.index = attn.layer_idx
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.silu = type(self.act).__name__ in ("SiLU", "SiLUActivation")
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.head_dim = attn.head_dim
        self.heads = self.q.out_features // attn.head_dim
        self.kv_heads = self.k.out_features // attn.head_dim
        self.scaling = attn.scaling
        self.window = attention.layer_window(attn)


class DecoderForward:
    """Runs a supported model's forward for one engine step (see the module doc)."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers]

    @classmethod
    def create(cls, model: nn.Module) -> DecoderForward | None:
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
        return cls(model)

    def __call__(self, position_ids: torch.Tensor, keep_index: torch.Tensor, meta: attention.AttentionMeta,
                 input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(keep_index), vocab] of the kept rows. input_ids [1, T] or inputs_embeds [1, T, hidden].

        On CPU in float32 the element-wise steps run in C (`native.add_rms_norm`, `rope_store`,
        `silu_mul`); elsewhere the model's own norms and transformers' formulas. Each layer's residual
        add is folded into the next norm."""
        h = self.embed(input_ids)[0] if inputs_embeds is None else inputs_embeds[0].clone()  # [T, hidden], ours
        cos, sin = self.rotary(h[None], position_ids)
        cos, sin = cos[0], sin[0]  # [T, D]
        in_c = native.takes_float32(h)
        T = h.shape[0]
        delta = None
        for layer in self.layers:
            h, x = _add_norm(h, delta, layer.norm1, in_c)
            q, k, v = self._qkv(layer, x)
            q, k = _rope_store(q, k, v, cos, sin, meta, layer.index, in_c)
            out = attention.attend(layer.attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                   v.transpose(0, 1)[None], meta, layer.scaling, layer.window)
            h, x = _add_norm(h, layer.o(out.view(T, -1)), layer.norm2, in_c)
            gate, up = layer.gate(x), layer.up(x)
            if in_c and layer.silu:
                delta = layer.down(native.silu_mul(gate, up, torch.empty_like(gate)))
            else:
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


def _add_norm(h: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module,
              in_c: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, norm(h + delta)); delta None: nothing to add. In C, h is updated in place."""
    if in_c:
        return h, native.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon, torch.empty_like(h))
    if delta is not None:
        h = h + delta
    return h, norm(h)


def _rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: attention.AttentionMeta, layer: int, in_c: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, KVH, D] rotated (in place in C), k and v written to the layer's cache
    slots; returns the rotated q and k."""
    if in_c:
        native.rope_store(q, k, v, cos, sin, meta.cache.k[layer], meta.cache.v[layer], meta.slot_mapping)
        return q, k
    q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
    attention.store_kv(meta, layer, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    return q, k
