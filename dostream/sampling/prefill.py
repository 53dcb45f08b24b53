"""Prompts into KV caches (buckets of similar length, last-position logits): knows nothing of
sampling or of which rows are running."""

from __future__ import annotations

import inspect

import torch

from dostream.cached_forward import CachedForward
from dostream.sampling.kvcache import _CachedPrefix, _prefixed_cache, _reserved_cache


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return name in inspect.signature(base.forward).parameters


def cache_kwarg(model) -> str:
    """transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _buckets(lengths: list[int]) -> list[tuple[int, int]]:
    """Split sorted lengths into runs that pad each other by at most ~1/8 (and 8 tokens)."""
    out, lo = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] > lengths[lo] + max(8, lengths[lo] // 8):
            out.append((lo, i))
            lo = i
    return out


def _prefill_inputs(
    model,
    prompts: list[tuple[int, ...]],
    pad: int,
    buckets: bool = True,
    hits: list[_CachedPrefix | None] | None = None,
    loras: list | None = None,
):
    """The prompts in buckets of similar length, so padding costs little compute: yields (lo, hi,
    width, (ids, position, mask, cache)) per bucket of prompts[lo:hi], each left padded to its
    width, the last four what `_forward` runs (into the bucket's own, fresh cache). `loras[i]`:
    prompt i's adapter (`sampling.adapters.Lora`, None: the base model), the part's fifth element.

    `hits[i]`: a cached prefix of prompt i (`PrefixCache.hits`) whose keys and values stand in for
    its first tokens, so only the rest runs (prompts are then sorted by the length of that rest):
    the bucket's cache holds them where a prefill of the whole prompts would have put them
    (`_prefixed_cache`), so every row is laid out as then, left padding first."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    starts = [len(h.ids) if h is not None else 0 for h in hits] if hits else [0] * len(prompts)
    rest = [len(p) - s for p, s in zip(prompts, starts)]
    for lo, hi in _buckets(rest) if buckets else [(0, len(prompts))]:
        width, new = max(len(p) for p in prompts[lo:hi]), max(rest[lo:hi])
        ids = torch.full((hi - lo, new), pad, dtype=torch.long)
        mask = torch.zeros((hi - lo, width), dtype=torch.long)
        for r, (p, s) in enumerate(zip(prompts[lo:hi], starts[lo:hi])):
            ids[r, new - len(p) + s :] = torch.tensor(p[s:])  # left padding: the next token goes in the last column
            mask[r, width - len(p) :] = 1
        mask = mask.to(device)
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, width - new :]  # as transformers' generate
        if any(starts[lo:hi]):
            part = _prefixed_cache(model.config, hits[lo:hi], rest[lo:hi], width, new)
        else:
            part = DynamicCache(config=model.config)
        adapters = loras[lo:hi] if loras and any(a is not None for a in loras[lo:hi]) else None
        yield lo, hi, width, (ids.to(device), position, mask, part, *([adapters] if adapters else []))


def _forward(model, step: CachedForward | None, parts: list[tuple]) -> list[torch.Tensor]:
    """Each part's last-position logits: parts are (ids, position, mask, cache), a decode step's or
    a prefill bucket's. `step` runs them all in one forward (`CachedForward.many`: one product per
    linear layer for every part's tokens); the model's forward runs them one by one, and takes no
    per-row adapters (a part's fifth element: `CachedForward` only)."""
    if step is not None:
        return step.many(parts)
    if any(len(part) > 4 and part[4] is not None for part in parts):
        raise ValueError("per-row adapters need the sampler's own forward (CachedForward: Llama-family models)")
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_kw = cache_kwarg(model)
    return [
        model(
            input_ids=ids, attention_mask=mask, position_ids=position, **{cache_kw: cache}, use_cache=True, **extra
        ).logits[:, -1]
        for ids, position, mask, cache, *_ in parts
    ]


def _prefill_parts(
    model,
    prompts: list[tuple[int, ...]],
    pad: int,
    step: CachedForward | None,
    buckets: bool = True,
    hits: list[_CachedPrefix | None] | None = None,
    loras: list | None = None,
):
    """Run the prompts through the model (or `step`) bucket by bucket (`_prefill_inputs`): yields
    (lo, hi, width, the bucket's own cache, its last-position logits) per bucket of prompts[lo:hi]."""
    for lo, hi, width, part in _prefill_inputs(model, prompts, pad, buckets, hits, loras):
        [logits] = _forward(model, step, [part])
        yield lo, hi, width, part[3], logits


def _prefill(
    model,
    prompts: list[tuple[int, ...]],
    pad: int,
    capacity: int,
    step: CachedForward | None = None,
    hits: list[_CachedPrefix | None] | None = None,
    loras: list | None = None,
):
    """Prefill the prompts (sorted as `_prefill_parts` wants them) in buckets and gather their
    caches, left padded, into one reserved cache of `capacity` columns (`loras`: per prompt, its
    adapter or None; they need `step` and the reserved cache).
    Returns (cache, last-position logits, attention mask, whether the cache is the reserved one)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        mask[r, width - len(p) :] = 1
    mask = mask.to(device)
    cache = _reserved_cache(model.config, capacity)
    logits = []
    for lo, hi, w, part, lg in _prefill_parts(
        model,
        prompts,
        pad,
        step if cache is not None else None,
        cache is not None,
        hits if cache is not None else None,
        loras,
    ):
        logits.append(lg)
        if cache is None:
            return part, logits[0], mask, False
        for layer, done in zip(cache.layers, part.layers):
            layer.load(lo, hi, width - w, done.keys, done.values, len(prompts))
    return cache, torch.cat(logits), mask, True
