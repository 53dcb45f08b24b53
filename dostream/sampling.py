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

The decode loop is our own: prompts sorted by length and prefilled in buckets of similar length
(little padding compute), identical prompts prefilled once, one left-padded batch with attention
mask and position ids, a transformers `DynamicCache` whose layers write into storage reserved for
the whole decode instead of concatenating, last-position logits only, finished rows dropped.
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
from dataclasses import dataclass
from typing import Literal

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
    eos = set(config.eos_token_ids) if config.eos_token_ids is not None else _default_eos(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
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
                ids = _decode_batch(
                    run, [prompts[i] for i in rows], [seeds[i] for i in rows], config, eos, pad, tokenizer, step
                )
                for i, (toks, reason) in zip(rows, ids):
                    out[i] = Sample(toks, decode(tokenizer, toks), reason, len(prompts[i]))
    finally:
        for m, training in modes.items():
            m.training = training
    return out  # type: ignore[return-value]


def _default_eos(model, tokenizer) -> set[int]:
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
    """A transformers `DynamicCache` whose layers write into reserved storage, `capacity` tokens
    and doubled when full (the stock layer concatenates: a copy of the whole cache every token),
    filled by `_prefill`.
    None for models with other layer kinds (sliding windows, ...): they get the stock cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def load(self, lo: int, hi: int, offset: int, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
            """Rows lo:hi hold a prefill of width keys.shape[2], right aligned at `offset`."""
            if not self.is_initialized:
                self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
                # Zeros, not garbage, in the padding: it is masked, but a NaN would survive the mask.
                self._k = keys.new_zeros(rows, keys.shape[1], capacity, keys.shape[3])
                self._v = values.new_zeros(rows, values.shape[1], capacity, values.shape[3])
                self._len = offset + keys.shape[2]
            self._k[lo:hi, :, offset : self._len] = keys
            self._v[lo:hi, :, offset : self._len] = values
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if not self.is_initialized:
                raise RuntimeError("the reserved cache is filled by _prefill first")
            if self._len + n > self._k.shape[2]:  # full: double (a copy per doubling, not per token)
                more = max(self._k.shape[2], n)
                self._k = torch.cat([self._k, self._k.new_zeros(*self._k.shape[:2], more, self._k.shape[3])], dim=2)
                self._v = torch.cat([self._v, self._v.new_zeros(*self._v.shape[:2], more, self._v.shape[3])], dim=2)
            self._k[:, :, self._len : self._len + n] = key_states
            self._v[:, :, self._len : self._len + n] = value_states
            self._len += n
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

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


def _prefill(model, prompts: list[tuple[int, ...]], pad: int, capacity: int, step: CachedForward | None = None):
    """Run the prompts (sorted by length) through the model (or `step`) in buckets of similar
    length, so padding costs little compute, and gather their caches, left padded, into one
    reserved cache.
    Returns (cache, last-position logits, attention mask, whether the cache is the reserved one)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(map(len, prompts))
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's next token goes in the last column
        mask[r, width - len(p) :] = 1
    mask = mask.to(device)
    cache = _reserved_cache(model.config, capacity)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_kw = cache_kwarg(model)
    logits = []
    for lo, hi in _buckets([len(p) for p in prompts]) if cache is not None else [(0, len(prompts))]:
        w = max(len(p) for p in prompts[lo:hi])
        ids = torch.full((hi - lo, w), pad, dtype=torch.long)
        for r, p in enumerate(prompts[lo:hi]):
            ids[r, w - len(p) :] = torch.tensor(p)
        part_mask = mask[lo:hi, width - w :]
        position = (part_mask.cumsum(-1) - 1).masked_fill(part_mask == 0, 0)  # as transformers' generate
        part = DynamicCache(config=model.config)
        if step is not None and cache is not None:
            logits.append(step(ids.to(device), position, part_mask, part))
        else:
            logits.append(
                model(
                    input_ids=ids.to(device),
                    attention_mask=part_mask,
                    position_ids=position,
                    **{cache_kw: part},
                    use_cache=True,
                    **extra,
                ).logits[:, -1]
            )
        if cache is None:
            return part, logits[0], mask, False
        for layer, done in zip(cache.layers, part.layers):
            layer.load(lo, hi, width - w, done.keys, done.values, len(prompts))
    return cache, torch.cat(logits), mask, True


def _decode_batch(model, prompts, seeds, config, eos, pad, tokenizer, step) -> list[tuple[list[int], FinishReason]]:
    device = next(model.parameters()).device
    # Identical prompts (n samples of one question) are prefilled once, then the cache is copied.
    unique: dict[tuple[int, ...], int] = {}
    inverse = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    room = min(config.max_new_tokens, _RESERVE_FIRST)  # longer rows grow the cache; most stop well before
    cache, logits, mask, reserved = _prefill(model, list(unique), pad, max(map(len, unique)) + room, step)
    step = step if reserved else None  # (no reserved cache: layers other than full attention)
    position = torch.tensor([[len(p) - 1] for p in unique], device=device)
    if len(unique) < len(prompts):
        expand = torch.tensor(inverse, device=device)
        cache.batch_select_indices(expand)
        mask, position, logits = mask[expand], position[expand], logits[expand]

    steps = config.max_new_tokens
    uniforms = (
        None
        if config.is_greedy
        else torch.stack(
            [torch.rand(steps, generator=_row_generator(*seed), dtype=torch.float64) for seed in seeds]
        ).to(device)
    )
    generated: list[list[int]] = [[] for _ in prompts]
    finish: list[FinishReason | None] = [None] * len(prompts)
    active = list(range(len(prompts)))  # batch position -> row in `prompts`
    # A stop string is found in the decoding of a row's last tokens only (not the whole row, every
    # step): a character is at most 4 byte-level tokens, so this many tokens cover any stop string.
    window = 4 * max(map(len, config.stop), default=0) + 4
    cache_kw = cache_kwarg(model)
    scratch = None if uniforms is None else torch.empty(logits.shape, device=device)
    for t in range(steps):
        nxt = _pick(logits, None if uniforms is None else uniforms[active, t], config, scratch)
        for j, tok in enumerate(nxt.tolist()):
            r = active[j]
            generated[r].append(tok)
            if tok in eos:
                finish[r] = "eos"
            elif config.stop and any(s in decode(tokenizer, generated[r][-window:]) for s in config.stop):
                finish[r] = "stop"  # earlier tokens did not complete it, so this token did
            elif t == steps - 1:
                finish[r] = "length"
        keep = [j for j, r in enumerate(active) if finish[r] is None]
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows: they would cost a full row of compute per step
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, position, nxt = mask[sel], position[sel], nxt[sel]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        position = position + 1
        if step is not None:
            logits = step(nxt[:, None], position, mask, cache)
        else:
            logits = model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=position, **{cache_kw: cache}, use_cache=True
            ).logits[:, -1]
    return [(g, f) for g, f in zip(generated, finish)]  # type: ignore[misc]


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
    eos = set(config.eos_token_ids) if config.eos_token_ids is not None else _default_eos(model, tokenizer)
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
