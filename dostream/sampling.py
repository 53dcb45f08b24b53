"""Sampling: batched generation that returns, for every row, the exact token ids the model sampled.

The sampled ids are where an agent's tokens are born, so provenance is recorded here and never
reconstructed: `Sample.token_ids` are the ids in the order they were drawn, the EOS token
included when the model chose to stop (that decision is part of its action), and
`Sample.text` is their decoding with nothing skipped or cleaned up. `agent_segment(sample)` turns a
sample into the `agent` segment that `Renderer` emits as those same ids (docs/design.md invariant 2).

>>> from dostream.models import load_model, load_tokenizer               # doctest: +SKIP
>>> tok, model = load_tokenizer("smollm2"), load_model("smollm2")       # doctest: +SKIP
>>> prompt = tok("Question:\\n2+2?\\n\\nProposed solution:\\n")["input_ids"]  # doctest: +SKIP
>>> [s] = sample(model, tok, [prompt], SamplingConfig(max_new_tokens=32, stop=("\\n\\n",)))  # doctest: +SKIP
>>> stream.segments.append(agent_segment(s))                            # doctest: +SKIP

The decode loop is our own, `Decode`: rows join a running decode between steps and leave as they
end (continuous batching: the server adds the requests that arrived meanwhile; `sample` adds a
batch and steps it to the end). A step is one forward, then one token per row: the forward takes
the running rows' last tokens and the joining rows' prompts together (a join costs no forward of
its own; a forward's cost on a CPU is mostly reading the weights), and a row that ends leaves
before any further forward. Prompts are prefilled in buckets of similar length (little
padding compute), identical prompts once; the rows share one left-padded batch with attention mask
and position ids, in a transformers `DynamicCache` whose layers write into reserved storage
instead of concatenating; last-position logits only; an ended row's slot is filled by moving the
last row into it. Each row has its own settings (temperature, top-p, stop strings, budget), an
optional per-token hook (streaming) and optional prefixes its output must begin with (a forced
tool call: the model chooses among what they allow, `Sample.constrained` counts those ids).
Llama-family models (Llama, Mistral, Qwen2) prefill and decode with `cached_forward.CachedForward`
(for SmolLM2-135M at batch 32 on 2 CPU cores, ~29 ms per decode step in bf16 against ~42 ms
through the model's forward); other models call their forward.
Nucleus sampling is exact but rarely sorts the vocabulary: the nucleus is looked for among the
top 64 tokens, then 1024, and only rows whose nucleus is larger still are sorted in full.
Randomness is per row: row `i` draws from its own generator seeded by `(seed, i)`, so a row's
sample depends on its prompt, its index and the seed, not on which prompts share its batch or on
`batch_size` (up to float rounding, which differs between batch shapes).

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
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dostream.cached_forward import CachedForward
from dostream.config import opt
from dostream.render import decode
from dostream.stream import Segment, Stream

FinishReason = Literal["eos", "stop", "length"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_RESERVE_FIRST = 256  # new tokens the KV cache has room for before it first doubles
_TOPK_FIRST = 64  # nucleus candidates tried first (a trained model's nucleus is usually smaller)


@dataclass
class SamplingConfig:
    """How to sample. `SamplingConfig(greedy=True)` is deterministic argmax decoding (evaluation)."""

    temperature: float = opt(1.0, "softmax temperature; 0 means greedy")
    top_p: float = opt(1.0, "nucleus sampling: draw from the most likely tokens that together hold this mass")
    max_new_tokens: int = opt(256, "new tokens per row, the EOS token included")
    stop: tuple[str, ...] = opt((), "stop strings: a row ends after the token that completes one (kept whole)")
    seed: int = opt(
        0, "random seed: row i draws from a generator seeded by (seed, i); same seed and config, same samples"
    )
    greedy: bool = opt(False, "argmax decoding (temperature, top-p and seed are ignored)")
    # Rows are sorted by length first; 64 beat 32 by ~15% on 2 CPU cores.
    batch_size: int = opt(64, "rows decoded together")
    dtype: str = opt(
        "auto",
        "dtype to sample in: auto (the model's own; bf16 on a CUDA GPU), or a cast copy in fp32, bf16 or fp16",
        choices=("auto", *_DTYPES),
    )
    # None: the tokenizer's EOS ids and the generation config's; (): none.
    eos_token_ids: tuple[int, ...] | None = opt(None, "token ids that end a row")
    backend: str = opt(
        "auto",
        "auto (vLLM for a model on a CUDA GPU when vllm is installed, else torch), torch or vllm",
        choices=("auto", "torch", "vllm"),
    )
    fast_step: bool = opt(
        True, "Llama-family models decode with cached_forward.CachedForward (off: the model's forward)"
    )

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for ok, what in [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (all(self.stop), "stop strings must be non-empty"),
            (
                self.dtype == "auto" or self.dtype in _DTYPES,
                f"dtype must be auto or one of {list(_DTYPES)}, got {self.dtype!r}",
            ),
            (self.backend in ("auto", "torch", "vllm"), f"backend must be auto, torch or vllm, got {self.backend!r}"),
        ]:
            if not ok:
                raise ValueError(what)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class Sample:
    """One sampled continuation: exactly what the model drew, ready to be an `agent` segment."""

    token_ids: list[int]  # the sampled ids in order, EOS included if sampled
    text: str  # tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    finish_reason: (
        FinishReason  # "eos": sampled an EOS id; "stop": completed a stop string; "length": hit max_new_tokens
    )
    prompt_len: int  # number of prompt tokens the row was conditioned on
    constrained: int = 0  # leading ids drawn under a prefix constraint (`Decode.add(prefixes=)`: a forced tool call)


def agent_segment(sample: Sample, **kwargs) -> Segment:
    """The `agent` segment for a sample: its text and its exact sampled ids (`kwargs` go to
    `Segment`, e.g. `role=` or `meta=`)."""
    return Segment("agent", sample.text, token_ids=list(sample.token_ids), **kwargs)


def generate_for_streams(model, renderer, streams: list[Stream], config: SamplingConfig | None = None) -> list[Sample]:
    """Sample the agent's next turn for every stream (conditioned on `renderer.prompt_ids`).

    >>> for s, smp in zip(streams, generate_for_streams(model, renderer, streams, cfg)):  # doctest: +SKIP
    ...     s.segments.append(agent_segment(smp))
    """
    return sample(model, renderer.tok, [renderer.prompt_ids(s) for s in streams], config)


def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    config: SamplingConfig | None = None,
    *,
    row_seeds: list[tuple[int, int]] | None = None,
    forward: CachedForward | None = None,
) -> list[Sample]:
    """Sample one continuation per prompt (token-id lists); outputs are in the order of `prompts`.

    Pass the same prompt n times for n samples: each copy has its own random stream, and the
    prompt is prefilled once. The model is put in eval mode for the call and restored after.
    `row_seeds[i] = (seed, j)` gives row i the random stream of row j of a call seeded `seed`
    (default `(config.seed, i)`): a server batching requests gives each request's rows its own seed,
    so a request samples what it would alone, whatever shares its batch. `forward`: a
    `CachedForward.build(model)` kept by a caller that samples many times from unchanged weights
    (a server), so its weight reorder is paid once, not per call.
    """
    config = config or SamplingConfig()
    prompts = [[int(t) for t in p] for p in prompts]
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds has {len(row_seeds)} entries for {len(prompts)} prompts")
    seeds = list(row_seeds) if row_seeds is not None else [(config.seed, i) for i in range(len(prompts))]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: sampling needs at least one token to condition on")
    if not prompts:
        return []
    if _use_vllm(model, config):
        return _sample_vllm(model, tokenizer, prompts, config, seeds)
    eos = set(config.eos_token_ids) if config.eos_token_ids is not None else default_eos(model, tokenizer)
    run = _in_dtype(model, config.dtype)
    # Similar lengths share a batch (little padding); identical prompts end up adjacent.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i]))
    out: list[Sample | None] = [None] * len(prompts)
    modes = {m: m.training for m in run.modules()}  # restored after: dropout off while sampling
    run.eval()
    try:
        with torch.inference_mode():
            if not config.fast_step:
                step = None
            elif forward is not None and run is model:
                step = forward
            else:
                step = CachedForward.build(run)  # (its weight copies: no autograd)
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                batch = Decode(run, tokenizer, forward=step, eos=eos)
                batch.add([prompts[i] for i in rows], [seeds[i] for i in rows], [config] * len(rows), rows)
                while batch.active:
                    for row in batch.step():
                        out[row.tag] = Sample(row.ids, decode(tokenizer, row.ids), row.reason, row.prompt_len)
    finally:
        for m, training in modes.items():
            m.training = training
    return out  # type: ignore[return-value]


def default_eos(model, tokenizer) -> set[int]:
    """The ids that end a row unless a config names its own: the tokenizer's EOS and the generation config's."""
    eos = set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos.update([gen] if isinstance(gen, int) else (gen or []))
    return eos


def _in_dtype(model, dtype: str):
    """The model to sample with: itself, or a cast copy (the caller's weights are never touched)."""
    have = next(model.parameters()).dtype
    if dtype == "auto":
        # On CPU, auto keeps the model's dtype, the policy being trained. bf16 pays only where the
        # CPU has fast bf16 matmuls: sampling measured 0.8x fp32 here (Intel, AVX512-BF16, no AMX;
        # matmul 0.5x), while the AMD EPYC of docs/reference.md §4 has 2.3x bf16 matmuls: pass dtype="bf16" there.
        on_cuda = next(model.parameters()).is_cuda
        want = torch.bfloat16 if on_cuda and have == torch.float32 and torch.cuda.is_bf16_supported() else have
    else:
        want = _DTYPES[dtype]
    if want == have:
        return model
    with torch.no_grad():
        return copy.deepcopy(model).to(want)


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return name in inspect.signature(base.forward).parameters


def cache_kwarg(model) -> str:
    """transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _row_seed(seed: int, row: int) -> int:
    return (seed * 1_000_003 + row) % (2**63)


def _row_generator(seed: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(_row_seed(seed, row))


def _reserved_cache(model_config, capacity: int):
    """A transformers `DynamicCache` whose layers write into reserved storage instead of
    concatenating (the stock layer copies the whole cache every token), filled by `_prefill`.

    A layer's storage is (slots, heads, capacity, head_dim); the live cache is rows [0, n) and
    columns [lo, end) of it, and `keys`/`values` are views of that block. New tokens go in column
    `end`; when it is full the block moves to column 0, into storage twice as large if need be (a
    copy per doubling, not per token). Rows join at slots n.. (`append`) and leave by moving the
    last rows into their slots (`move_rows`, a copy of the moved rows only); columns every live row
    ignores are dropped from the left (`drop_left`, no copy). Stale columns left of a row's prompt
    hold finite values from earlier rows (or zeros): masked, and a NaN would survive a mask.
    None for models with other layer kinds (sliding windows, ...): they get the stock cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def load(self, lo: int, hi: int, offset: int, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
            """Rows lo:hi hold a prefill of width keys.shape[2], right aligned at `offset`."""
            if not self.is_initialized:
                self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
                self._k = keys.new_zeros(rows, keys.shape[1], capacity, keys.shape[3])
                self._v = values.new_zeros(rows, values.shape[1], capacity, values.shape[3])
                self._lo, self._end, self._n = 0, offset + keys.shape[2], rows
            self._k[lo:hi, :, offset : self._end] = keys
            self._v[lo:hi, :, offset : self._end] = values
            self._view()

        def _view(self) -> None:
            self.keys = self._k[: self._n, :, self._lo : self._end]
            self.values = self._v[: self._n, :, self._lo : self._end]

        def relayout(self, slots: int, capacity: int, lo: int) -> None:
            """Fresh storage of `slots` x `capacity`, the live block copied to start at column `lo`."""
            width = self._end - self._lo
            k = self._k.new_zeros(slots, self._k.shape[1], capacity, self._k.shape[3])
            v = self._v.new_zeros(slots, self._v.shape[1], capacity, self._v.shape[3])
            k[: self._n, :, lo : lo + width] = self.keys
            v[: self._n, :, lo : lo + width] = self.values
            self._k, self._v, self._lo, self._end = k, v, lo, lo + width
            self._view()

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if not self.is_initialized:
                raise RuntimeError("the reserved cache is filled by _prefill first")
            if self._end + n > self._k.shape[2]:  # full: to column 0, doubled if that is not room enough
                capacity = self._k.shape[2]
                while self._end - self._lo + n > capacity:
                    capacity *= 2
                self.relayout(self._k.shape[0], capacity, 0)
            self._k[: self._n, :, self._end : self._end + n] = key_states
            self._v[: self._n, :, self._end : self._end + n] = value_states
            self._end += n
            self._view()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._n = len(indices)
            self._view()

        def make_room(self, rows: int, width: int) -> int:
            """Room for `rows` live rows and a live block `width` columns wide (widened on the
            left); returns how many columns were added on the left."""
            slots, have = self._k.shape[0], self._end - self._lo
            more = max(0, width - have)
            if rows > slots or self._end - width < 0:
                self.relayout(max(rows, 2 * slots if rows > slots else slots), max(self._k.shape[2], 2 * width), more)
            self._lo = min(self._lo, self._end - width)
            self._view()
            return more

        def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """New rows at slots n.., their prefill right aligned at the last column (`make_room` first)."""
            rows, width = keys.shape[0], keys.shape[2]
            self._k[self._n : self._n + rows, :, self._end - width : self._end] = keys
            self._v[self._n : self._n + rows, :, self._end - width : self._end] = values
            self._n += rows
            self._view()

        def move_rows(self, dst: list[int], src: list[int], rows: int) -> None:
            """Rows `src` move to slots `dst`; `rows` rows stay live."""
            if dst:
                self._k[dst, :, self._lo : self._end] = self._k[src, :, self._lo : self._end]
                self._v[dst, :, self._lo : self._end] = self._v[src, :, self._lo : self._end]
            self._n = rows
            self._view()

        def drop_left(self, columns: int) -> None:
            self._lo += columns
            self._view()

    cache = DynamicCache(config=model_config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [ReservedLayer() for _ in cache.layers]
    return cache


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
):
    """The prompts in buckets of similar length, so padding costs little compute: yields (lo, hi,
    width, (ids, position, mask, cache)) per bucket of prompts[lo:hi], each left padded to its
    width, the last four what `_forward` runs (into the bucket's own, fresh cache).

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
        yield lo, hi, width, (ids.to(device), position, mask, part)


def _forward(model, step: CachedForward | None, parts: list[tuple]) -> list[torch.Tensor]:
    """Each part's last-position logits: parts are (ids, position, mask, cache), a decode step's or
    a prefill bucket's. `step` runs them all in one forward (`CachedForward.many`: one product per
    linear layer for every part's tokens); the model's forward runs them one by one."""
    if step is not None:
        return step.many(parts)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_kw = cache_kwarg(model)
    return [
        model(
            input_ids=ids, attention_mask=mask, position_ids=position, **{cache_kw: cache}, use_cache=True, **extra
        ).logits[:, -1]
        for ids, position, mask, cache in parts
    ]


def _prefill_parts(
    model,
    prompts: list[tuple[int, ...]],
    pad: int,
    step: CachedForward | None,
    buckets: bool = True,
    hits: list[_CachedPrefix | None] | None = None,
):
    """Run the prompts through the model (or `step`) bucket by bucket (`_prefill_inputs`): yields
    (lo, hi, width, the bucket's own cache, its last-position logits) per bucket of prompts[lo:hi]."""
    for lo, hi, width, part in _prefill_inputs(model, prompts, pad, buckets, hits):
        [logits] = _forward(model, step, [part])
        yield lo, hi, width, part[3], logits


def _prefixed_cache(model_config, hits: list[_CachedPrefix | None], rest: list[int], width: int, new: int):
    """A bucket's prefill cache in which row r's cached prefix sits right before its rest[r] new
    tokens, right aligned in `width` columns: the layout of a prefill of the whole prompts.

    The forward runs `new` columns of new tokens; a row with fewer has padding tokens in the first
    ones, where its prefix may end: there the layer keeps the prefix's keys and values and drops
    what the padding tokens computed. So a row's real columns are contiguous, never with padding
    inside them (padding inside changes how the attention sums round, while leading padding
    leaves it as it is: the row then samples bit for bit as it does beside other batch mates)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PrefixedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            key_states = torch.where(real, key_states, self.tail_keys)
            value_states = torch.where(real, value_states, self.tail_values)
            return super().update(key_states, value_states)

    first = next(h for h in hits if h is not None)
    device = first.keys[0].device
    real = torch.zeros(len(hits), 1, new, 1, dtype=torch.bool, device=device)
    for r, n in enumerate(rest):
        real[r, :, new - n :] = True
    groups: dict[tuple[int, int], tuple[_CachedPrefix, list[int]]] = {}  # (prefix, where it ends) -> rows
    for r, (h, n) in enumerate(zip(hits, rest)):
        if h is not None:
            groups.setdefault((id(h), n), (h, []))[1].append(r)
    cache = DynamicCache(config=model_config)
    cache.layers = []
    for i, (k0, v0) in enumerate(zip(first.keys, first.values)):
        keys = k0.new_zeros(len(hits), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(hits), v0.shape[1], width, v0.shape[3])
        for (_, n), (h, rows) in groups.items():  # (a prefix several rows share: one copy per layer)
            keys[rows, :, width - n - len(h.ids) : width - n] = h.keys[i]
            values[rows, :, width - n - len(h.ids) : width - n] = h.values[i]
        layer = PrefixedLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys[:, :, : width - new], values[:, :, : width - new]
        layer.tail_keys, layer.tail_values = keys[:, :, width - new :], values[:, :, width - new :]
        cache.layers.append(layer)
    return cache


def _prefill(
    model,
    prompts: list[tuple[int, ...]],
    pad: int,
    capacity: int,
    step: CachedForward | None = None,
    hits: list[_CachedPrefix | None] | None = None,
):
    """Prefill the prompts (sorted as `_prefill_parts` wants them) in buckets and gather their
    caches, left padded, into one reserved cache of `capacity` columns.
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
        model, prompts, pad, step if cache is not None else None, cache is not None, hits if cache is not None else None
    ):
        logits.append(lg)
        if cache is None:
            return part, logits[0], mask, False
        for layer, done in zip(cache.layers, part.layers):
            layer.load(lo, hi, width - w, done.keys, done.values, len(prompts))
    return cache, torch.cat(logits), mask, True


@dataclass(eq=False)
class _CachedPrefix:
    """A cached prefix: its token ids and, per layer, its keys and values (1, kv_heads, len, head_dim)."""

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class PrefixCache:
    """Keys and values of leading token prefixes that prompts share (a chat template's head and
    default system prompt, a tools preamble, an instruction), computed once for one model and reused:
    a prompt that begins with a cached prefix prefills only the rest (`Decode(prefix_cache=...)`).

    Entries are made from the prompts themselves, never from text: a prompt's longest common prefix
    with another prompt of the same `Decode.add` or one of the last `history` prompts (one token short
    of the whole prompt at most: its last position's logits are needed) becomes an entry when it is
    at least `min_tokens` longer than the entry the prompt already has. A prefix that is a whole
    earlier prompt is not one: that is a conversation going on, which would prefill the same tokens
    once either way. Entries are kept exact (keyed by their ids) and least recently used first out,
    at most `entries` of them and `tokens` tokens in all.

    The cache belongs to the model it was made for: `Decode` refuses another model's (a hot swap
    through `serve.batcher.ModelSlot` starts a new cache). Models whose cache is not the sampler's
    reserved one (sliding windows, ...) get no entries.

    >>> run = Decode(model, tok, prefix_cache=PrefixCache(model))   # doctest: +SKIP
    """

    def __init__(self, model, *, entries: int = 8, tokens: int = 4096, min_tokens: int = 16, history: int = 64):
        from collections import OrderedDict, deque

        self.model, self.max_entries, self.max_tokens, self.min_tokens = model, entries, tokens, min_tokens
        self.usable = _reserved_cache(model.config, 1) is not None
        self._entries: OrderedDict[tuple[int, ...], _CachedPrefix] = OrderedDict()
        self._history: deque[tuple[int, ...]] = deque(maxlen=history)
        # Counters (tests, benchmarks): entries made, prompt tokens their rows did not prefill.
        self.made = self.reused = 0

    def hits(self, prompts: list[tuple[int, ...]], pad: int, step: CachedForward | None) -> list[_CachedPrefix | None]:
        """For each prompt, its longest cached prefix (shorter than the prompt), after making the
        entries these prompts call for (each prefilled once, on top of the longest entry it extends)."""
        if not self.usable:
            return [None] * len(prompts)
        for ids in sorted(self._wanted(prompts), key=len):
            base = self._longest(ids)
            if len(ids) - (len(base.ids) if base else 0) < self.min_tokens:
                continue
            [(_, _, _, part, _)] = _prefill_parts(self.model, [ids], pad, step, hits=[base])
            self._put(_CachedPrefix(ids, [a.keys for a in part.layers], [a.values for a in part.layers]))
        self._history.extend(prompts)
        found = [self._longest(p) for p in prompts]
        self.reused += sum(len(h.ids) for h in found if h is not None)
        return found

    def _wanted(self, prompts: list[tuple[int, ...]]) -> set[tuple[int, ...]]:
        """The prefixes worth an entry: for each prompt its longest common prefix with a prompt
        seen recently or beside it (found among its neighbours in sorted order)."""
        seen = set(self._history)
        known = sorted(seen | set(prompts))
        at = {p: i for i, p in enumerate(known)}
        wanted = set()
        for p in set(prompts):
            have = self._longest(p, touch=False)
            best = 0
            for q in known[max(0, at[p] - 1) : at[p] + 2]:
                n = min(_common(p, q), len(p) - 1)
                if (q != p or p in seen) and n != len(q):  # (a prompt sent again: all but its last token)
                    best = max(best, n)
            if best >= (len(have.ids) if have else 0) + self.min_tokens and best <= self.max_tokens:
                wanted.add(p[:best])
        return wanted

    def _longest(self, ids: tuple[int, ...], touch: bool = True) -> _CachedPrefix | None:
        """The longest entry that is a prefix of `ids` and shorter (marked recently used)."""
        best = None
        for key, entry in self._entries.items():
            if len(key) < len(ids) and ids[: len(key)] == key and (best is None or len(key) > len(best.ids)):
                best = entry
        if best is not None and touch:
            self._entries.move_to_end(best.ids)
        return best

    def _put(self, entry: _CachedPrefix) -> None:
        self._entries[entry.ids] = entry
        self.made += 1
        while len(self._entries) > self.max_entries or sum(map(len, self._entries)) > self.max_tokens:
            self._entries.popitem(last=False)


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


@dataclass
class _Row:
    """One row of a running decode: its settings, its random stream, what it drew so far."""

    tag: Any
    config: SamplingConfig
    eos: set[int]
    prompt_len: int
    uniforms: list[float] | None  # its generator's draws, one per step (None: greedy)
    hook: Callable[[int], None] | None
    prefixes: tuple[tuple[int, ...], ...] | None  # its output must begin with one of these
    ids: list[int] = field(default_factory=list)
    reason: FinishReason | None = None  # set when it ends
    constrained: int = 0  # steps drawn under the prefix constraint

    def allowed(self) -> list[int] | None:
        """The tokens a prefix constraint leaves at this step (None: any)."""
        if not self.prefixes:
            return None
        t = len(self.ids)
        live = [p for p in self.prefixes if len(p) > t and list(p[:t]) == self.ids]
        if not live or any(len(p) <= t and list(p) == self.ids[: len(p)] for p in self.prefixes):
            self.prefixes = None  # a prefix is complete: free from here on
            return None
        self.constrained += 1
        return sorted({p[t] for p in live})


class Decode:
    """A decode in progress that rows join between steps (`add`) and leave as they end (`step`).

    This is the sampler's one decode loop. `sample` adds a batch and steps it to the end; the
    server adds the requests that arrived meanwhile before every step (continuous batching), so
    none waits for the longest row of a batch it was not in. A row is its prompt, its random stream
    `(seed, j)`, its own `SamplingConfig` (temperature, top-p, stop strings, budget), an optional
    `hook(token)` called as each of its tokens is drawn (streaming), and optional `prefixes`: token
    sequences its output must begin with one of (a forced tool call; the model still chooses among
    what they allow). Row r's t-th token uses the t-th uniform of its own generator, whatever shares
    the batch and whenever it joined, so it draws what it would alone, up to float rounding.
    Models whose cache is not the reserved one (sliding windows, ...) decode a batch but take no
    rows into it once it runs (`joinable`). `prefix_cache`: a `PrefixCache` made for `model`, kept
    between decodes by a caller whose prompts share leading tokens (the server): joining rows
    prefill only what follows their longest cached prefix.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        forward: CachedForward | None = None,
        eos: set[int] | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        if prefix_cache is not None and prefix_cache.model is not model:
            raise ValueError("this prefix cache was made for another model: its keys and values are not this model's")
        self.model, self.tok, self.forward, self.prefix_cache = model, tokenizer, forward, prefix_cache
        self.eos = set(eos) if eos is not None else default_eos(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []
        self.joining: list[tuple[_Row, list[int]]] = []  # added, prefilled by the next step
        self.cache = None
        self.joinable = True
        self.mask = self.position = self.logits = None
        self._tokens: torch.Tensor | None = None  # each row's last token, drawn, not yet forwarded
        self._scratch: torch.Tensor | None = None

    @property
    def active(self) -> int:
        """Rows decoding or joining."""
        return len(self.rows) + len(self.joining)

    def add(
        self,
        prompts: list[list[int]],
        seeds: list[tuple[int, int]],
        configs: list[SamplingConfig],
        tags: list[Any],
        hooks: list[Callable[[int], None] | None] | None = None,
        prefixes: list[tuple[tuple[int, ...], ...] | None] | None = None,
    ) -> None:
        """Rows join: the next `step` prefills their prompts (identical prompts once, similar
        lengths together) in the same forward as the running rows' next tokens."""
        if self.rows and not self.joinable:
            raise RuntimeError("this model's cache takes no rows into a running decode")
        for i, (p, c) in enumerate(zip(prompts, configs)):
            draws = (
                None
                if c.is_greedy
                else torch.rand(c.max_new_tokens, generator=_row_generator(*seeds[i]), dtype=torch.float64)
            )
            row = _Row(
                tag=tags[i],
                config=c,
                eos=set(c.eos_token_ids) if c.eos_token_ids is not None else self.eos,
                prompt_len=len(p),
                uniforms=None if draws is None else draws.tolist(),
                hook=hooks[i] if hooks else None,
                prefixes=prefixes[i] if prefixes else None,
            )
            self.joining.append((row, list(p)))

    @torch.inference_mode()
    def step(self) -> list[_Row]:
        """One forward, then one token for every row: the forward takes the running rows' last
        tokens and the joining rows' prompts together (`_forward`: with `CachedForward`, one product
        per linear layer for all of them, so a join costs no forward of its own); rows that end
        leave at once, before any further forward. Returns the rows that ended (`tag`, `ids`,
        `reason`, `prompt_len`, `constrained`)."""
        joining, self.joining = self.joining, []
        running = None
        if self.rows:  # their last drawn tokens, into the cache
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            self.position = self.position + 1
            running = (self._tokens[:, None], self.position, self.mask, self.cache)
        if joining:
            self._join(joining, running)
        elif running is not None:
            [self.logits] = _forward(self.model, self.forward, [running])
        if not self.rows:
            return []
        tokens = self._choose()
        ended, keep = [], []
        for j, (row, tok) in enumerate(zip(self.rows, tokens.tolist())):
            row.ids.append(tok)
            if row.hook is not None:
                row.hook(tok)
            row.reason = self._finished(row, tok)
            if row.reason is None:
                keep.append(j)
            else:
                ended.append(row)
        if not keep:
            self.rows, self.cache, self._tokens = [], None, None
            return ended
        if len(keep) < len(self.rows):
            tokens = self._drop(keep, tokens)
        self._tokens = tokens
        return ended

    def _join(self, joining: list[tuple[_Row, list[int]]], running: tuple | None) -> None:
        """Prefill the joining rows (in the forward of the running rows' `running` step, if any);
        they take the slots after the running rows, right aligned with them."""
        prompts = [p for _, p in joining]
        unique = sorted({tuple(p) for p in prompts})
        hits = (
            self.prefix_cache.hits(unique, self.pad, self.forward)
            if self.prefix_cache is not None
            else [None] * len(unique)
        )
        # Sorted by what is left to prefill (the whole prompt where no prefix is cached).
        pairs = sorted(zip(unique, hits), key=lambda u: (len(u[0]) - (len(u[1].ids) if u[1] else 0), u[0]))
        unique, hits = [p for p, _ in pairs], [h for _, h in pairs]
        index = {p: u for u, p in enumerate(unique)}
        inverse = [index[tuple(p)] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: inverse[i])  # slots in prefill order
        inv = torch.tensor([inverse[i] for i in order], device=self.device)
        positions = torch.tensor([[len(prompts[i]) - 1] for i in order], device=self.device)
        if self.cache is None:
            room = min(max(row.config.max_new_tokens for row, _ in joining), _RESERVE_FIRST)
            self.cache, logits, mask, reserved = _prefill(
                self.model, unique, self.pad, max(map(len, unique)) + room, self.forward, hits
            )
            self.joinable = reserved
            self.forward = self.forward if reserved else None  # (no reserved cache: layers other than full attention)
            if len(unique) < len(prompts):
                self.cache.batch_select_indices(inv)
                mask, logits = mask[inv], logits[inv]
            self.mask, self.logits, self.position = mask, logits, positions
        else:
            parts = list(_prefill_inputs(self.model, unique, self.pad, hits=hits))
            [now, *done] = _forward(self.model, self.forward, [running, *(part for *_, part in parts)])
            width = max(map(len, unique))
            more = 0
            for layer in self.cache.layers:
                more = layer.make_room(len(self.rows) + len(prompts), width)
            if more:
                self.mask = torch.cat([self.mask.new_zeros(len(self.rows), more), self.mask], dim=1)
            mask = self.mask.new_zeros(len(prompts), self.mask.shape[1])
            for r, i in enumerate(order):
                mask[r, mask.shape[1] - len(prompts[i]) :] = 1
            logits = [now]
            for (lo, hi, _, (*_, part)), lg in zip(parts, done):
                pick = inv[(inv >= lo) & (inv < hi)] - lo
                for layer, prefilled in zip(self.cache.layers, part.layers):
                    layer.append(prefilled.keys[pick], prefilled.values[pick])
                logits.append(lg[pick])
            self.mask = torch.cat([self.mask, mask])
            self.logits = torch.cat(logits)
            self.position = torch.cat([self.position, positions])
        self.rows += [joining[i][0] for i in order]

    def _finished(self, row: _Row, tok: int) -> FinishReason | None:
        if tok in row.eos:
            return "eos"
        stop = row.config.stop
        # A stop string is looked for in the decoding of the row's last tokens only (not the whole
        # row, every step): a character is at most 4 byte-level tokens, so this many cover it.
        if stop and any(s in decode(self.tok, row.ids[-(4 * max(map(len, stop)) + 4) :]) for s in stop):
            return "stop"  # earlier tokens did not complete it, so this token did
        if len(row.ids) >= row.config.max_new_tokens:
            return "length"
        return None

    def _drop(self, keep: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Ended rows leave: the last live rows move into their slots; columns no row sees go."""
        rows = len(keep)
        kept = set(keep)
        holes = [j for j in range(rows) if j not in kept]
        movers = [j for j in keep if j >= rows]
        order = list(range(rows))
        for h, s in zip(holes, movers):
            order[h] = s
        sel = torch.tensor(order, device=self.device)
        if self.joinable:
            for layer in self.cache.layers:
                layer.move_rows(holes, movers, rows)
        else:
            self.cache.batch_select_indices(sel)
        self.rows = [self.rows[j] for j in order]
        self.mask, self.position = self.mask[sel], self.position[sel]
        if self.joinable:
            first = int(self.mask.any(0).long().argmax())  # leading columns only padding
            if first:
                for layer in self.cache.layers:
                    layer.drop_left(first)
                self.mask = self.mask[:, first:]
        return tokens[sel]

    def _choose(self) -> torch.Tensor:
        """Each row's next token: by its own settings, under its prefix constraint if any."""
        logits = self.logits
        if logits.dtype != torch.float32:
            logits = logits.float()  # (argmax and softmax of bf16 are slow on CPUs)
        for j, row in enumerate(self.rows):
            allowed = row.allowed()
            if allowed is not None:
                ids = torch.tensor(allowed, device=logits.device)
                kept = logits[j, ids].clone()
                logits[j] = torch.finfo(logits.dtype).min
                logits[j, ids] = kept
        if self._scratch is None or len(self._scratch) < len(logits):
            self._scratch = torch.empty(
                (max(len(logits), 2 * (len(self._scratch) if self._scratch is not None else 0)), logits.shape[1])
            )
        groups: dict[tuple, list[int]] = {}
        for j, row in enumerate(self.rows):
            c = row.config
            groups.setdefault((c.is_greedy, c.temperature, c.top_p), []).append(j)
        if len(groups) == 1:
            return self._pick(logits, list(range(len(self.rows))))
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        for idx in groups.values():
            sel = torch.tensor(idx, device=logits.device)
            tokens[sel] = self._pick(logits[sel], idx)
        return tokens

    def _pick(self, logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
        rows = [self.rows[j] for j in idx]
        if rows[0].config.is_greedy:
            return _pick(logits, None, rows[0].config)
        u = torch.tensor([r.uniforms[len(r.ids)] for r in rows], dtype=torch.float64, device=logits.device)
        return _pick(logits, u, rows[0].config, self._scratch)


def _pick(
    logits: torch.Tensor, u: torch.Tensor | None, config: SamplingConfig, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row: argmax, or inverse-CDF sampling with the row's uniform `u` from the
    temperature-scaled distribution truncated to its nucleus (as transformers' TopPLogitsWarper:
    keep a token while the mass of the more likely ones is below top_p).

    `scratch`: a float32 buffer of at least logits' shape for the probabilities, reused between
    decode steps: a fresh batch-by-vocabulary buffer every step is fresh memory pages every step,
    which made this 3x slower inside the decode loop (32 x 49152 on a CPU).
    """
    if u is None:  # argmax; max's indices are the same (the first of equal maxima) at 1/3 of argmax's CPU time
        return logits.max(-1).indices
    probs = scratch[: len(logits)] if scratch is not None else torch.empty(logits.shape, device=logits.device)
    probs.copy_(logits).div_(config.temperature)  # softmax, in place
    probs.sub_(probs.amax(-1, keepdim=True)).exp_()
    probs.div_(probs.sum(-1, keepdim=True))
    vocab = probs.shape[-1]
    if config.top_p >= 1.0:
        return _invert(probs.double().cumsum(-1), u).clamp(max=vocab - 1)
    return _nucleus(probs, u, config.top_p, min(_TOPK_FIRST, vocab))


def _nucleus(probs: torch.Tensor, u: torch.Tensor, top_p: float, k: int) -> torch.Tensor:
    """Top-p sampling among the k most likely tokens, exact for every row whose nucleus fits in
    them; the other rows are redone with more candidates, up to the whole vocabulary."""
    top, idx = probs.topk(k, dim=-1)  # sorted, most likely first
    p = top.double()
    cum = p.cumsum(-1)
    kept = torch.where(cum - p < top_p, p, torch.zeros_like(p))
    tokens = idx.gather(1, _invert(kept.cumsum(-1), u).clamp(max=k - 1)[:, None])[:, 0]
    spill = cum[:, -1] < top_p  # the (k+1)-th token would still be kept
    if k < probs.shape[-1] and bool(spill.any()):
        more = k * 16 if k * 16 < probs.shape[-1] // 4 else probs.shape[-1]  # topk cost grows with k: step up
        tokens[spill] = _nucleus(probs[spill], u[spill], top_p, more)
    return tokens


def _invert(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative mass exceeds u × total (a zero-mass token is never chosen)."""
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True)[:, 0]


# -- optional vLLM backend ------------------------------------------------------------------------
def _use_vllm(model, config: SamplingConfig) -> bool:
    """vLLM only for a model on a CUDA GPU with vllm importable (CPU models, tests: torch)."""
    if config.backend == "torch":
        return False
    available = torch.cuda.is_available() and next(model.parameters()).is_cuda and _vllm_installed()
    if config.backend == "vllm" and not available:
        raise RuntimeError("backend='vllm' needs the model on a CUDA GPU and the vllm package")
    return available


def _vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # not installed, or installed without a usable GPU build
        return False
    return True


def _sample_vllm(
    model, tokenizer, prompts: list[list[int]], config: SamplingConfig, seeds: list[tuple[int, int]]
) -> list[Sample]:
    """UNTESTED (no GPU where this was written). vLLM serves a model from a directory, so the
    current weights (a PEFT adapter merged into a copy) are exported to a temporary directory on
    every call: simple and always on-policy, but it pays a model load per call. Ids come from vLLM
    (its own random streams, seeded per row); text and finish reasons are recomputed here by the
    same rules as the torch path."""
    import gc
    import tempfile

    from vllm import LLM, SamplingParams, TokensPrompt

    export = copy.deepcopy(model)
    if hasattr(export, "merge_and_unload"):
        export = export.merge_and_unload()
    eos = set(config.eos_token_ids) if config.eos_token_ids is not None else default_eos(model, tokenizer)
    dtype = "bfloat16" if config.dtype in ("auto", "bf16") else {"fp32": "float32", "fp16": "float16"}[config.dtype]
    params = [
        SamplingParams(
            temperature=0.0 if config.is_greedy else config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            stop=list(config.stop),
            stop_token_ids=sorted(eos),
            ignore_eos=config.eos_token_ids is not None,  # then stop_token_ids alone decide
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            seed=_row_seed(*seeds[i]),
        )
        for i in range(len(prompts))
    ]
    with tempfile.TemporaryDirectory(prefix="dostream-vllm-") as tmp:
        export.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del export
        # A modest share of GPU memory: the model being trained lives on the same GPU.
        llm = LLM(model=tmp, dtype=dtype, seed=config.seed, enable_prefix_caching=True, gpu_memory_utilization=0.4)
        try:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    samples = []
    for p, o in zip(prompts, outs):
        toks = list(o.outputs[0].token_ids)
        text = decode(tokenizer, toks)
        reason: FinishReason = (
            "eos" if toks and toks[-1] in eos else "stop" if any(s in text for s in config.stop) else "length"
        )
        samples.append(Sample(toks, text, reason, len(p)))
    return samples
