"""The sampler's forward for Llama-family models (Llama, Mistral, Qwen2): prefill and decode steps.

A decode step pushes one new token per row through the model. transformers' forward serves every
model, shape and cache; for a small model decoding a batch on a CPU its generality costs as much as
its matmuls: an attention mask built per step, cache bookkeeping, and an attention kernel blocked
for long queries that runs a 1-token query at a fraction of the speed of two plain batched matmuls.
`CachedForward` replaces that glue; the model's own modules (embedding, norms, rotary embedding,
MLP activation) are called as the forward calls them. On a CPU with oneDNN, the linear layers run
as oneDNN products on weights reordered once per call, q/k/v and gate/up each fused into one
product: MKL, which backs `F.linear` in fp32, measured ~220 GFLOP/s on the AMD EPYC here against
oneDNN's ~490, and bf16 skips oneDNN's per-call weight reorder. A PEFT LoRA layer in its plain form
runs as its base product plus its own adapter modules, as PEFT computes it; any other layer (DoRA,
quantised, a merged or disabled adapter) is called as it is, and so is everything off the CPU.
Keys and values go into the cache's layers (`update`); the sampler prefills each bucket of prompts
into a fresh cache and decodes in its reserved one.

This is the model's forward up to float rounding (attention sums in another order); tests compare
both on prefills and on the same cache token by token, for Llama, Qwen2 (biased projections) and a
PEFT LoRA model. Models of other architectures, or with sliding-window attention, get none
(`CachedForward.build` returns None) and the sampler calls the model's forward.
"""

from __future__ import annotations

import functools
import os

import torch

_FAMILIES = ("llama", "mistral", "qwen2")  # decoder layers: pre-norm attention + pre-norm gated MLP


class CachedForward:
    """`forward(ids, position, mask, cache)` -> logits of each row's last position.

    ids, position: (B, T) the new tokens of each row (a left-padded prompt, or the last sampled
    token) and their position ids; mask: (B, L) 1 for real tokens, 0 for left padding, over the
    cache's L - T positions and the T new ones; cache: a transformers cache (or the sampler's
    reserved one) to which the T new positions are appended. New tokens attend causally.
    """

    def __init__(self, model, *, fast_linear: bool = False):
        self.model = model
        self.layers = [_Layer(layer, fast_linear, i) for i, layer in enumerate(model.model.layers)]
        self.lm_head = _linear(model.lm_head) if fast_linear else model.lm_head
        self._stacks = {}  # adapters' weights as `adapters.Mix` multiplies them, kept between steps

    @classmethod
    def build(cls, model) -> CachedForward | None:
        """The forward for `model` (a PEFT wrapper too), or None where it does not apply.

        The oneDNN products (`_linear`, `_fused`) hold a reordered copy of the linear weights for
        as long as the forward lives (one `sample` call); they are skipped where that copy would take
        more than a quarter of the memory available.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
        if config.model_type not in _FAMILIES or sliding or not hasattr(base, "lm_head"):
            return None
        weights = [m.weight for m in base.modules() if isinstance(m, torch.nn.Linear)]
        copy_bytes = sum(w.numel() * w.element_size() for w in weights)
        fast = weights[0].device.type == "cpu" and copy_bytes < _available_memory() / 4
        return cls(base, fast_linear=fast)

    def __call__(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        [logits] = self.many([(ids, position, mask, cache)])
        return logits

    def many(self, parts: list[tuple]) -> list[torch.Tensor]:
        """`__call__` for several (ids, position, mask, cache) at once, each part's logits: the
        parts' tokens go through every linear layer as one product (a decode step's rows and the
        prompts joining them, of other shapes, in other caches), and attend each in its own cache.
        A product's cost on a CPU is mostly reading its weights once, whatever the rows (SmolLM2-135M,
        fp32, one thread: 50 ms for 1 row, 104 ms for 32), so a join in the same forward as a
        decode step costs a fraction of a forward of its own.

        A part may carry a fifth element, its rows' LoRA adapters (`sampling.adapters.Lora`, None
        for the base model): every row's tokens share the base products and add their own adapter's
        delta (`adapters.Mix`), so rows of many adapters decode in one forward."""
        inner = self.model.model
        shapes = [tuple(ids.shape) for ids, *_ in parts]
        per_token = [
            lora
            for (b, t), part in zip(shapes, parts)
            for lora in (part[4] if len(part) > 4 and part[4] is not None else [None] * b)
            for _ in range(t)
        ]
        mix = None
        if any(lora is not None for lora in per_token):
            from dostream.sampling.adapters import Mix  # (sampling imports this module)

            mix = Mix(per_token, self._stacks)
        x = inner.embed_tokens(torch.cat([ids.reshape(-1) for ids, *_ in parts]))  # (N, hidden), all parts' tokens
        # Per part, once a step rather than once a layer: the rotary (cos, sin) as `_rotate` takes
        # them, and the attention bias in the form and dtype `_Layer._attend` takes.
        ropes = [_rotary(*inner.rotary_emb(x, part[1])) for part in parts]
        biases = [_attention_bias(part[2], t, x.dtype) for (_, t), part in zip(shapes, parts)]
        for i, layer in enumerate(self.layers):
            cached = [part[3].layers[i] for part in parts]
            x = x + layer.attention(layer.norm1(x), shapes, ropes, biases, cached, mix)
            x = x + layer.mlp(layer.norm2(x), mix)
        last, at = [], 0
        for b, t in shapes:
            last.append(x[at : at + b * t].view(b, t, -1)[:, -1])
            at += b * t
        return list(self.lm_head(inner.norm(torch.cat(last))).split([b for b, _ in shapes]))


def _attention_bias(mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask for T new tokens over L positions: left padding and, within the new tokens, the
    future are out. None when nothing is (one token, no padding). fp32: (B, 1, 1, T, L), as the
    fp32 products of `_Layer._attend` take it; another dtype: (B, 1, T, L) in that dtype, as torch's
    fused attention takes it. The dtype's most negative value rather than -inf: a padding query,
    which sees nothing, gets a finite uniform average (ignored later) instead of NaN, which would
    spread through the masked cache."""
    seen = mask.bool()[:, None, :]  # (B, 1, L)
    if new > 1:
        width, device = mask.shape[1], mask.device
        past = torch.arange(width, device=device)[None, :] <= torch.arange(width - new, width, device=device)[:, None]
        seen = seen & past[None]  # (B, T, L)
    elif bool(seen.all()):
        return None
    if dtype != torch.float32:
        bias = torch.zeros(seen.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]
    bias = torch.zeros(seen.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~seen, torch.finfo(torch.float32).min)[:, None, None]


def _rotary(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's (B, T, head_dim) cos and sin as `_rotate` takes them: (B, T, 1,
    head_dim), the sine's first half negated."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(2), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding of x (B, T, heads, head_dim), `x * cos + rotate_half(x) * sin`, with
    rotate_half(x) = cat(-x2, x1) written as the halves swapped times the sign `_rotary` put into the
    sine: the same products and sum, rounded as the model rounds them, in 4 operations for q and k
    together where the model's takes 10 (55 -> 36 us a layer, 40 rows, bf16). Not `addcmul`: in
    bf16 it rounds once or twice depending on where an element falls in the vectorised loop, so a
    row's values would depend on the size of its batch."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin


class _Layer:
    """One decoder layer's modules, its linear layers as `_linear` makes them where `fast_linear`."""

    def __init__(self, layer, fast_linear: bool, index: int = 0):
        self.index = index  # (an adapter's weights are per layer: `adapters.Mix`)
        self.attn, self._mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        a, m = self.attn, self._mlp
        fast = _linear if fast_linear else lambda module: module
        gated = all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        # q, k and v in one product where they are plain linear layers: (N, (heads + 2 kv_heads) * head_dim).
        self.qkv = _fused([a.q_proj, a.k_proj, a.v_proj]) if fast_linear else None
        if self.qkv is None:
            self.q, self.k, self.v = fast(a.q_proj), fast(a.k_proj), fast(a.v_proj)
        else:
            self.qk_width = a.q_proj.out_features + a.k_proj.out_features
            self.heads = a.q_proj.out_features // a.head_dim
        self.o = fast(a.o_proj)
        self.gate_up = _fused([m.gate_proj, m.up_proj]) if fast_linear and gated else None
        if gated and self.gate_up is None:
            self.gate, self.up = fast(m.gate_proj), fast(m.up_proj)
        self.down = fast(m.down_proj) if gated else None

    def attention(self, h, shapes, ropes, biases, cached, mix=None) -> torch.Tensor:
        """Attention of the parts' tokens `h` (N, hidden), part by part (its (B, T) shape, rotary
        (cos, sin) from `_rotary`, bias and cache layer); one output projection for all. `mix`:
        each token's adapter delta added to every projection (`adapters.Mix`)."""
        dim, a = self.attn.head_dim, self.attn
        if self.qkv is not None:  # q and k side by side in the product's output: rotated together
            qkv = self.qkv(h)
            if mix is not None:
                widths = (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features)
                mix.add(qkv, h, self.index, ("q_proj", "k_proj", "v_proj"), widths)
            qk_all, v_all = qkv[:, : self.qk_width], qkv[:, self.qk_width :]
        else:
            q_all, k_all, v_all = self.q(h), self.k(h), self.v(h)
            if mix is not None:
                for out, name in ((q_all, "q_proj"), (k_all, "k_proj"), (v_all, "v_proj")):
                    mix.add(out, h, self.index, (name,), (out.shape[1],))
        outs, at = [], 0
        for (rows, new), (cos, sin), bias, layer in zip(shapes, ropes, biases, cached):
            n, part = rows * new, slice(at, at + rows * new)
            at += n
            if self.qkv is not None:
                qk = _rotate(qk_all[part].view(rows, new, -1, dim), cos, sin)
                q, k = qk[:, :, : self.heads], qk[:, :, self.heads :]
            else:
                q = _rotate(q_all[part].view(rows, new, -1, dim), cos, sin)
                k = _rotate(k_all[part].view(rows, new, -1, dim), cos, sin)
            v = v_all[part].view(rows, new, -1, dim)
            outs.append(self._attend(q, k, v, rows, new, bias, layer))
        heads = outs[0] if len(outs) == 1 else torch.cat(outs)
        out = self.o(heads)
        if mix is not None:
            mix.add(out, heads, self.index, ("o_proj",), (out.shape[1],))
        return out

    def _attend(self, q, k, v, rows, new, bias, cached) -> torch.Tensor:
        """q (B, T, heads, head_dim), k and v (B, T, kv_heads, head_dim), rotated -> (B * T, hidden)."""
        a, dim = self.attn, self.attn.head_dim
        keys, values = cached.update(k.transpose(1, 2), v.transpose(1, 2))  # (B, kv_heads, L, head_dim)
        groups = keys.shape[1]
        if keys.dtype != torch.float32:
            # bf16 (fp16): torch's fused attention, on the cache as it is (a strided view of its reserved
            # storage), 183 us a layer at 32 rows on one CPU thread against 353 us for the products
            # below, which need a contiguous copy of the cache in bf16. Not for fp32: its results
            # depend on the batch's shape beyond the products' rounding (a seeded row's draws changed
            # with its batch mates in tests/serve/test_batching.py), and it is no faster there.
            if new == 1:
                # A decode step: the query heads of one key/value head are the queries of one attention
                # over it (B, kv_heads, group, head_dim), no heads repeated: 245 us a layer against 392
                # for `enable_gqa` (40 rows, 100 positions, 2 threads). The bias broadcasts over them.
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.view(rows, groups, -1, dim), keys, values, attn_mask=bias, scale=a.scaling
                )  # (B, kv_heads, group, head_dim): the heads in order
                return out.reshape(rows, -1)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=bias, scale=a.scaling, enable_gqa=True
            )  # (B, heads, T, head_dim)
            return out.transpose(1, 2).reshape(rows * new, -1)
        # fp32: grouped-query attention as two batched matmuls: the query heads of one key/value head
        # (and their T positions) are the rows of one product. The cache may be a strided view of its
        # reserved storage; the products read it as it is (no copy of the whole cache per layer and
        # step: 562 -> 334 us a layer at 32 rows, one CPU thread; the same sums).
        q = q.transpose(1, 2).reshape(rows, groups, -1, dim)  # (B, kv_heads, group * T, head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * a.scaling
        if bias is not None:
            scores = (scores.view(rows, groups, -1, new, scores.shape[-1]) + bias).view(scores.shape)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # (B, kv_heads, group * T, head_dim)
        return out.view(rows, -1, new, dim).transpose(1, 2).reshape(rows * new, -1)

    def mlp(self, h, mix=None) -> torch.Tensor:
        if self.down is None:  # not the gated MLP of this family: the module as it is
            assert mix is None, "per-row adapters need the gated MLP of the Llama family"
            return self._mlp(h)
        if self.gate_up is not None:
            both = self.gate_up(h)
            if mix is not None:
                mix.add(both, h, self.index, ("gate_proj", "up_proj"), (both.shape[1] // 2,) * 2)
            gate, up = both.chunk(2, dim=-1)
        else:
            gate, up = self.gate(h), self.up(h)
            if mix is not None:
                mix.add(gate, h, self.index, ("gate_proj",), (gate.shape[1],))
                mix.add(up, h, self.index, ("up_proj",), (up.shape[1],))
        inner = self._mlp.act_fn(gate) * up
        out = self.down(inner)
        if mix is not None:
            mix.add(out, inner, self.index, ("down_proj",), (out.shape[1],))
        return out


@functools.cache
def _onednn(dtype: torch.dtype) -> bool:
    """Does this torch build run oneDNN's reordered-weight products for `dtype`, and agree with
    `F.linear`? Checked once per process on a small product; where not (a build or CPU without
    them), plain linear layers are called as they are."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((3, 64), (48, 64), (48,)))
    try:
        got = _product(w, b)(x)
    except Exception:  # the ops are missing here, or refuse this dtype
        return False
    return torch.allclose(got.float(), torch.nn.functional.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)


def _plain(module) -> bool:
    """A plain `nn.Linear` that oneDNN's products can take over."""
    return type(module) is torch.nn.Linear and _onednn(module.weight.dtype)


def _available_memory() -> float:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume room
        return float("inf")


def _product(weight: torch.Tensor, bias: torch.Tensor | None):
    """h -> h @ weight.T + bias as a oneDNN product, the weight reordered for it once. On CPUs where
    MKL's fp32 GEMM is slow (AMD EPYC: ~220 GFLOP/s against oneDNN's ~490) this is 2.6x the fp32
    `F.linear` for a 32-row decode step; bf16 gains ~1.3x from skipping the per-call reorder."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    return lambda h: torch.ops.mkldnn._linear_pointwise(h, packed, bias, "none", [], "")


def _linear(module):
    """A faster callable with `module`'s output: a plain `nn.Linear` as a oneDNN `_product`; a PEFT
    LoRA layer in its plain form (unmerged, adapters on, no variant such as DoRA) as the product of
    its base layer plus its own adapter modules, as PEFT computes it; anything else: the module."""
    if _plain(module):
        return _product(module.weight, module.bias)
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return module
    if (
        type(module) is not LoraLinear
        or module.merged
        or module.disable_adapters
        or not _plain(module.base_layer)
        or module.lora_variant
    ):
        return module
    base = _linear(module.base_layer)
    adapters = [
        (module.lora_A[a], module.lora_B[a], module.lora_dropout[a], module.scaling[a])
        for a in module.active_adapters
        if a in module.lora_A
    ]

    def lora(h):
        out = base(h)
        dtype = out.dtype
        for a, b, dropout, scaling in adapters:
            out = out + b(a(dropout(h.to(a.weight.dtype)))) * scaling
        return out.to(dtype)

    return lora


def _fused(projections):
    """One `_product` for plain `nn.Linear` projections of the same input, returning their outputs
    side by side (N, sum of their widths); None unless every projection is one (a PEFT layer keeps
    its own path)."""
    if not all(map(_plain, projections)):
        return None
    weight = torch.cat([p.weight for p in projections])
    bias = (
        None
        if all(p.bias is None for p in projections)
        else torch.cat([p.weight.new_zeros(p.out_features) if p.bias is None else p.bias for p in projections])
    )
    return _product(weight, bias)
