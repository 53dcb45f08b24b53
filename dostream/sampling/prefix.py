"""`PrefixCache`, the KV of prompts' shared leading tokens prefilled once and reused: knows nothing
of the decode loop that consults it.

A `PrefixCache` (the server keeps one per model in force) holds the keys and values of leading
token prefixes that prompts share, the chat template's head and default system prompt above all;
a row that begins with one prefills only the rest (SmolLM2-135M, fp32, one CPU thread, 32 chat
prompts of ~37 tokens: 77 -> 28 ms of prefill per request, 165 -> 114 ms with 22 new tokens).
Rounding: the prefix's keys and values come from a one-row prefill of the prefix alone, and the
rest attends to them laid out as in a prefill of the whole prompt (left padding first, never
inside a row: `_prefixed_cache`). So prefix reuse changes a row's logits by float rounding of
the kind its batch mates cause (measured: none, bit for bit the same through `CachedForward` on
SmolLM2-135M in fp32 and on a tiny test model; ~5e-6 through the model's own forward), and its
ids only where that rounding decides. Tests hold a row's greedy and seeded ids with the cache
equal to those without it and to those it draws alone (tiny models, fp32).

Entries are keyed by (adapter key, ids): a row with a LoRA adapter of its own
(`sampling.adapters.Lora`, rows of many adapters in one decode) reads and makes entries under its
adapter's key only, the base model's rows under "" (an adapter's keys and values are not the base's,
and a new version of an adapter is a new key: no row ever reads a stale entry).
"""

from __future__ import annotations

import torch

from dostream.cached_forward import CachedForward
from dostream.sampling.kvcache import _CachedPrefix, _reserved_cache
from dostream.sampling.prefill import _forward, _prefill_inputs, _prefill_parts


class PrefixCache:
    """Keys and values of leading token prefixes that prompts share (a chat template's head and
    default system prompt, a tools preamble, an instruction), computed once for one model and reused:
    a prompt that begins with a cached prefix prefills only the rest (`Decode(prefix_cache=...)`).

    Entries are made from the prompts themselves, never from text: a prompt's longest common prefix
    with another prompt of the same `Decode.add` or one of the last `history` prompts (one token short
    of the whole prompt at most: its last position's logits are needed) becomes an entry when it is
    at least `min_tokens` longer than the entry the prompt already has. A prefix that is a whole
    earlier prompt is not one: that is a conversation going on, which would prefill the same tokens
    once either way. Entries are kept exact (keyed by their adapter's key and their ids) and least
    recently used first out, at most `entries` of them and `tokens` tokens in all.

    The cache belongs to the model it was made for: `Decode` refuses another model's (a hot swap
    through `serve.batcher.ModelSlot` starts a new cache). Models whose cache is not the sampler's
    reserved one (sliding windows, ...) get no entries.

    >>> run = Decode(model, tok, prefix_cache=PrefixCache(model))   # doctest: +SKIP
    """

    def __init__(self, model, *, entries: int = 8, tokens: int = 4096, min_tokens: int = 16, history: int = 64):
        from collections import OrderedDict, deque

        self.model, self.max_entries, self.max_tokens, self.min_tokens = model, entries, tokens, min_tokens
        self.usable = _reserved_cache(model.config, 1) is not None
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _CachedPrefix] = OrderedDict()
        self._history: deque[tuple[int, ...]] = deque(maxlen=history)  # (the ids: common to every adapter)
        self._warmed: set[tuple[str, tuple[int, ...]]] = set()  # entries `warm` made (a session's input so far)
        # Counters (tests, benchmarks): entries made, prompt tokens their rows did not prefill.
        self.made = self.reused = 0

    def hits(
        self, prompts: list[tuple[int, ...]], pad: int, step: CachedForward | None, loras: list | None = None
    ) -> list[_CachedPrefix | None]:
        """For each prompt, its longest cached prefix (shorter than the prompt) under its adapter
        (`loras[i]`, a `sampling.adapters.Lora`; None or absent: the base model), after making the
        entries these prompts call for (each prefilled once, on top of the longest entry it extends)."""
        if not self.usable:
            return [None] * len(prompts)
        loras = loras or [None] * len(prompts)
        by_key = {_key(a): a for a in loras}
        for adapter, ids in sorted(self._wanted(prompts, loras), key=lambda w: (len(w[1]), w)):
            base = self._longest(ids, adapter)
            if len(ids) - (len(base.ids) if base else 0) < self.min_tokens:
                continue
            lora = by_key[adapter]
            [(_, _, _, part, _)] = _prefill_parts(self.model, [ids], pad, step, hits=[base], loras=[lora])
            self._put(_CachedPrefix(ids, [a.keys for a in part.layers], [a.values for a in part.layers], adapter))
        self._history.extend(prompts)
        found = [self._longest(p, _key(a)) for p, a in zip(prompts, loras)]
        self.reused += sum(len(h.ids) for h in found if h is not None)
        return found

    def warm_parts(self, prompts: list[tuple[int, ...]], pad: int) -> tuple[list, list, list]:
        """What `warm(prompts)` prefills, as forward parts a caller runs in a forward of its own
        (`Decode.step`: the running rows' step, so a prefill ahead costs no forward of its own):
        (prompts, their cached bases, [(lo, hi, width, part)]); `warm_store` then keeps them."""
        wanted = sorted(
            {tuple(p) for p in prompts if p and len(p) <= self.max_tokens} - {i for k, i in self._entries if not k}
        )
        if not self.usable or not wanted:
            return [], [], []
        bases = [self._longest(p) for p in wanted]
        order = sorted(range(len(wanted)), key=lambda i: len(wanted[i]) - (len(bases[i].ids) if bases[i] else 0))
        wanted, bases = [wanted[i] for i in order], [bases[i] for i in order]  # by what is left to prefill
        return wanted, bases, list(_prefill_inputs(self.model, wanted, pad, hits=bases))

    def warm_store(self, wanted: list, bases: list, parts: list) -> int:
        """Keep the entries `warm_parts`' parts hold once their forward ran; returns the tokens prefilled."""
        done = 0
        for lo, hi, _, bucket in parts:
            part = bucket[3]
            for r, ids in enumerate(wanted[lo:hi]):
                base = bases[lo + r]
                if hi - lo == 1:  # the bucket is this prompt alone: its cache is the entry
                    keys, values = [a.keys for a in part.layers], [a.values for a in part.layers]
                else:  # a copy: a view would keep the whole bucket's cache alive
                    keys = [a.keys[r : r + 1, :, -len(ids) :].clone() for a in part.layers]
                    values = [a.values[r : r + 1, :, -len(ids) :].clone() for a in part.layers]
                self._put(_CachedPrefix(ids, keys, values))
                if base is not None and ("", base.ids) in self._warmed and ("", base.ids) in self._entries:
                    del self._entries["", base.ids]
                self._warmed = {k for k in self._warmed if k in self._entries} | {("", ids)}
                done += len(ids) - (len(base.ids) if base else 0)
        return done

    @torch.inference_mode()
    def warm(self, prompts: list[tuple[int, ...]], pad: int, step: CachedForward | None) -> int:
        """Prefill each of `prompts` as an entry now, ahead of the prompt it will begin (a
        session's input so far, while the user is still typing: `serve/sessions.py`), all in one
        prefill (similar lengths bucketed together: a forward's cost on a CPU is mostly reading the
        weights), each on top of the longest entry it extends, so only its new tokens are computed;
        an earlier warm entry it extends is dropped (one entry per session, growing). Returns the
        tokens prefilled (0: nothing new, too long, or a model without the reserved cache)."""
        wanted, bases, parts = self.warm_parts(prompts, pad)
        if not parts:
            return 0
        _forward(self.model, step, [bucket for *_, bucket in parts])
        return self.warm_store(wanted, bases, parts)

    def _wanted(self, prompts: list[tuple[int, ...]], loras: list) -> set[tuple[str, tuple[int, ...]]]:
        """The prefixes worth an entry, with the adapter key each is for: for each prompt its longest
        common prefix with a prompt seen recently or beside it (found among its neighbours in sorted
        order), under the prompt's adapter."""
        seen = set(self._history)
        known = sorted(seen | set(prompts))
        at = {p: i for i, p in enumerate(known)}
        wanted = set()
        for adapter, p in {(_key(a), tuple(p)) for p, a in zip(prompts, loras)}:
            have = self._longest(p, adapter, touch=False)
            best = 0
            for q in known[max(0, at[p] - 1) : at[p] + 2]:
                n = min(_common(p, q), len(p) - 1)
                if (q != p or p in seen) and n != len(q):  # (a prompt sent again: all but its last token)
                    best = max(best, n)
            if best >= (len(have.ids) if have else 0) + self.min_tokens and best <= self.max_tokens:
                wanted.add((adapter, p[:best]))
        return wanted

    def _longest(self, ids: tuple[int, ...], adapter: str = "", touch: bool = True) -> _CachedPrefix | None:
        """The longest entry of `adapter` that is a prefix of `ids` and shorter (marked recently used)."""
        best = None
        for (owner, key), entry in self._entries.items():
            if (
                owner == adapter
                and len(key) < len(ids)
                and ids[: len(key)] == key
                and (best is None or len(key) > len(best.ids))
            ):
                best = entry
        if best is not None and touch:
            self._entries.move_to_end((adapter, best.ids))
        return best

    def _put(self, entry: _CachedPrefix) -> None:
        self._entries[entry.adapter, entry.ids] = entry
        self.made += 1
        while len(self._entries) > self.max_entries or sum(len(i) for _, i in self._entries) > self.max_tokens:
            self._entries.popitem(last=False)

    def adapters(self) -> set[str]:
        """The adapter keys entries are held for ("" the base model's)."""
        return {owner for owner, _ in self._entries}


def _key(lora) -> str:
    """An entry's adapter key: the adapter's (a name and version), "" for the base model."""
    return "" if lora is None else lora.key


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """The length of the longest common prefix of a and b (by halving: slices compare in C)."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; no longer than hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
