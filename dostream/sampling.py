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
batch and steps it to the end). Prompts are prefilled in buckets of similar length (little
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


def _prefill_parts(model, prompts: list[tuple[int, ...]], pad: int, step: CachedForward | None, buckets: bool = True):
    """Run the prompts (sorted by length) through the model (or `step`) in buckets of similar
    length, so padding costs little compute: yields (lo, hi, width, the bucket's own cache, its
    last-position logits) per bucket of prompts[lo:hi], each left padded to its width."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_kw = cache_kwarg(model)
    for lo, hi in _buckets([len(p) for p in prompts]) if buckets else [(0, len(prompts))]:
        w = max(len(p) for p in prompts[lo:hi])
        ids = torch.full((hi - lo, w), pad, dtype=torch.long)
        mask = torch.zeros((hi - lo, w), dtype=torch.long)
        for r, p in enumerate(prompts[lo:hi]):  # left padding: every row's next token goes in the last column
            ids[r, w - len(p) :] = torch.tensor(p)
            mask[r, w - len(p) :] = 1
        mask = mask.to(device)
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate
        part = DynamicCache(config=model.config)
        if step is not None:
            logits = step(ids.to(device), position, mask, part)
        else:
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask,
                position_ids=position,
                **{cache_kw: part},
                use_cache=True,
                **extra,
            ).logits[:, -1]
        yield lo, hi, w, part, logits


def _prefill(model, prompts: list[tuple[int, ...]], pad: int, capacity: int, step: CachedForward | None = None):
    """Prefill the prompts (sorted by length) in buckets (`_prefill_parts`) and gather their caches,
    left padded, into one reserved cache of `capacity` columns.
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
        model, prompts, pad, step if cache is not None else None, cache is not None
    ):
        logits.append(lg)
        if cache is None:
            return part, logits[0], mask, False
        for layer, done in zip(cache.layers, part.layers):
            layer.load(lo, hi, width - w, done.keys, done.values, len(prompts))
    return cache, torch.cat(logits), mask, True


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
    rows into it once it runs (`joinable`).
    """

    def __init__(self, model, tokenizer, *, forward: CachedForward | None = None, eos: set[int] | None = None):
        self.model, self.tok, self.forward = model, tokenizer, forward
        self.eos = set(eos) if eos is not None else default_eos(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []
        self.cache = None
        self.joinable = True
        self.mask = self.position = self.logits = None
        self._scratch: torch.Tensor | None = None

    @property
    def active(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(
        self,
        prompts: list[list[int]],
        seeds: list[tuple[int, int]],
        configs: list[SamplingConfig],
        tags: list[Any],
        hooks: list[Callable[[int], None] | None] | None = None,
        prefixes: list[tuple[tuple[int, ...], ...] | None] | None = None,
    ) -> None:
        """Rows join: their prompts are prefilled (identical prompts once, similar lengths together)."""
        if not prompts:
            return
        if self.rows and not self.joinable:
            raise RuntimeError("this model's cache takes no rows into a running decode")
        unique = sorted({tuple(p) for p in prompts}, key=lambda p: (len(p), p))
        index = {p: u for u, p in enumerate(unique)}
        inverse = [index[tuple(p)] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: inverse[i])  # slots in prefill order
        inv = torch.tensor([inverse[i] for i in order], device=self.device)
        positions = torch.tensor([[len(prompts[i]) - 1] for i in order], device=self.device)
        if self.cache is None:
            room = min(max(c.max_new_tokens for c in configs), _RESERVE_FIRST)
            self.cache, logits, mask, reserved = _prefill(
                self.model, unique, self.pad, len(unique[-1]) + room, self.forward
            )
            self.joinable = reserved
            self.forward = self.forward if reserved else None  # (no reserved cache: layers other than full attention)
            if len(unique) < len(prompts):
                self.cache.batch_select_indices(inv)
                mask, logits = mask[inv], logits[inv]
            self.mask, self.logits, self.position = mask, logits, positions
        else:
            width = len(unique[-1])
            more = 0
            for layer in self.cache.layers:
                more = layer.make_room(len(self.rows) + len(prompts), width)
            if more:
                self.mask = torch.cat([self.mask.new_zeros(len(self.rows), more), self.mask], dim=1)
            mask = self.mask.new_zeros(len(prompts), self.mask.shape[1])
            for r, i in enumerate(order):
                mask[r, mask.shape[1] - len(prompts[i]) :] = 1
            logits = []
            for lo, hi, _, part, lg in _prefill_parts(self.model, unique, self.pad, self.forward):
                pick = inv[(inv >= lo) & (inv < hi)] - lo
                for layer, done in zip(self.cache.layers, part.layers):
                    layer.append(done.keys[pick], done.values[pick])
                logits.append(lg[pick])
            self.mask = torch.cat([self.mask, mask])
            self.logits = torch.cat([self.logits, *logits])
            self.position = torch.cat([self.position, positions])
        for i in order:
            c = configs[i]
            draws = (
                None
                if c.is_greedy
                else torch.rand(c.max_new_tokens, generator=_row_generator(*seeds[i]), dtype=torch.float64)
            )
            self.rows.append(
                _Row(
                    tag=tags[i],
                    config=c,
                    eos=set(c.eos_token_ids) if c.eos_token_ids is not None else self.eos,
                    prompt_len=len(prompts[i]),
                    uniforms=None if draws is None else draws.tolist(),
                    hook=hooks[i] if hooks else None,
                    prefixes=prefixes[i] if prefixes else None,
                )
            )

    @torch.inference_mode()
    def step(self) -> list[_Row]:
        """One token for every row; rows that end leave the batch, the others advance by one
        forward. Returns the rows that ended (`tag`, `ids`, `reason`, `prompt_len`, `constrained`)."""
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
            self.rows, self.cache = [], None
            return ended
        if len(keep) < len(self.rows):
            tokens = self._drop(keep, tokens)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.position = self.position + 1
        if self.forward is not None:
            self.logits = self.forward(tokens[:, None], self.position, self.mask, self.cache)
        else:
            self.logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.mask,
                position_ids=self.position,
                **{cache_kwarg(self.model): self.cache},
                use_cache=True,
            ).logits[:, -1]
        return ended

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
    if u is None:
        return logits.argmax(-1)
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
