"""A one-token decode step for Llama-family models (Llama, Mistral, Qwen2), for `dostream.sampling`.

A decode step pushes one new token per row through the model. transformers' forward serves every
model, shape and cache; for a small model decoding a batch on a CPU its generality costs as much as
its matmuls: an attention mask built per step, cache bookkeeping, and an attention kernel blocked
for long queries that runs a 1-token query at a fraction of the speed of two plain batched matmuls.
`DecodeStep` replaces only that glue. The model's own modules still do the work: embedding,
norms, projections, MLP, rotary embedding and LM head are called as the forward calls them, so a
PEFT adapter on any of them applies exactly as in `model(...)` (and dropout is whatever the
module's mode says). Keys and values go into the sampler's reserved cache (`ReservedLayer`).

The step is the model's forward up to float rounding (attention sums in another order); tests
compare both on the same cache, token by token, for Llama, Qwen2 (biased projections) and a PEFT
LoRA model. Models of other architectures, or with sliding-window attention, get no step
(`DecodeStep.build` returns None) and the sampler calls the model's forward.
"""

from __future__ import annotations

import torch

_FAMILIES = ("llama", "mistral", "qwen2")  # decoder layers: pre-norm attention + pre-norm gated MLP


class DecodeStep:
    """`step(ids, position, mask, cache)` -> next-token logits, one token per row.

    ids: (B,) the last sampled token of each row; position: (B, 1) its position id; mask: (B, L)
    1 for real tokens, 0 for left padding, the new token included; cache: the reserved cache
    holding L - 1 positions, to which the step appends one.
    """

    def __init__(self, model, *, fuse: bool = False):
        self.model = model
        self.layers = [_Layer(layer, fuse) for layer in model.model.layers]

    @classmethod
    def build(cls, model) -> DecodeStep | None:
        """The step for `model` (a PEFT wrapper too), or None where it does not apply.

        On a CPU, projections of the same input that are plain `nn.Linear` layers (not a PEFT
        layer) are fused for the call: q, k, v into one product and gate, up into another. Fewer,
        wider products run faster there (-8% per step for SmolLM2-135M on 2 cores); the fused
        weights are a copy (about half the model) that lives as long as the step.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
        if config.model_type not in _FAMILIES or sliding or not hasattr(base, "lm_head"):
            return None
        return cls(base, fuse=next(base.parameters()).device.type == "cpu")

    def __call__(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        inner = self.model.model
        x = inner.embed_tokens(ids)  # (B, hidden)
        cos, sin = inner.rotary_emb(x, position)  # (B, 1, head_dim): broadcast over heads
        # Additive mask over the cached positions, shared by all heads; none when no row is padded.
        bias = None if bool(mask.all()) else torch.zeros(mask.shape, dtype=torch.float32, device=x.device).masked_fill_(
            mask == 0, float("-inf"))[:, None, None, :]
        for layer, cached in zip(self.layers, cache.layers):
            x = x + layer.attention(layer.norm1(x), cos, sin, bias, cached)
            x = x + layer.mlp(layer.norm2(x))
        return self.model.lm_head(inner.norm(x))


class _Layer:
    """One decoder layer's modules, with its projections fused where they are plain `nn.Linear`."""

    def __init__(self, layer, fuse: bool):
        self.norm1, self.attn, self.norm2, self._mlp = (layer.input_layernorm, layer.self_attn,
                                                        layer.post_attention_layernorm, layer.mlp)
        a, m = self.attn, self._mlp
        self.qkv = _fused([a.q_proj, a.k_proj, a.v_proj]) if fuse else None
        gated = all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        self.gate_up = _fused([m.gate_proj, m.up_proj]) if fuse and gated else None

    def attention(self, h, cos, sin, bias, cached) -> torch.Tensor:
        a, rows, dim = self.attn, h.shape[0], self.attn.head_dim
        q, k, v = self.qkv(h) if self.qkv else (a.q_proj(h), a.k_proj(h), a.v_proj(h))
        q = _rotate(q.reshape(rows, -1, dim), cos, sin)  # (B, heads, head_dim)
        k = _rotate(k.reshape(rows, -1, dim), cos, sin)  # (B, kv_heads, head_dim)
        keys, values = cached.update(k[:, :, None], v.reshape(rows, -1, 1, dim))  # (B, kv_heads, L, head_dim)
        # Grouped-query attention as two batched matmuls: the query heads of one key/value head
        # are the rows of one small product. The cache is a strided view of its reserved storage;
        # a contiguous copy is cheaper than the strided product (bf16 on CPU).
        q = q.view(rows, keys.shape[1], -1, dim)  # (B, kv_heads, group, head_dim)
        scores = torch.matmul(q, keys.contiguous().transpose(-1, -2)).float() * a.scaling
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return a.o_proj(torch.matmul(probs, values.contiguous()).reshape(rows, -1))

    def mlp(self, h) -> torch.Tensor:
        if self.gate_up is None:
            return self._mlp(h)
        gate, up = self.gate_up(h)
        return self._mlp.down_proj(self._mlp.act_fn(gate) * up)


def _fused(projections):
    """One product for several projections of the same input, returning their outputs split as a
    tuple; None unless every projection is a plain `nn.Linear` (a PEFT layer keeps its own path)."""
    if any(type(p) is not torch.nn.Linear for p in projections):
        return None
    weight = torch.cat([p.weight for p in projections])
    bias = None if all(p.bias is None for p in projections) else torch.cat(
        [p.weight.new_zeros(p.out_features) if p.bias is None else p.bias for p in projections])
    sizes = [p.out_features for p in projections]
    return lambda h: torch.nn.functional.linear(h, weight, bias).split(sizes, dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (transformers' `apply_rotary_pos_emb`, rotate-half layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
