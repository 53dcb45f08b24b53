"""`sample`, the front door: prompts in, one `Sample` each out, in batches through `Decode` (or
vLLM); knows nothing of the caches' layouts or of how a token is picked."""

from __future__ import annotations

import copy

import torch

from dostream.cached_forward import CachedForward
from dostream.device import resolve_precision, torch_dtype
from dostream.sampling.config import Sample, SamplingConfig, default_eos
from dostream.sampling.decoding import Decode
from dostream.sampling.vllm_backend import _sample_vllm, _use_vllm
from dostream.stream import Stream


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
    run = _in_precision(model, config.precision)
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
                        out[row.tag] = row.sample(tokenizer)
    finally:
        for m, training in modes.items():
            m.training = training
    return out  # type: ignore[return-value]


def _in_precision(model, precision: str):
    """The model to sample with: itself, or a cast copy (the caller's weights are never touched).

    `auto` is `device.resolve_precision`'s for fp32 weights (bf16 where a bf16 matmul measures
    faster on the model's device: a CUDA GPU with bf16, a CPU with fast bf16; on an AVX2-only CPU,
    fp32), and weights already in bf16 or fp16 stay as they are: whoever loaded them so (the
    server's --dtype) decided, and a copy per call would undo it. Sampling measured 0.8x fp32 on an
    Intel CPU with AVX512-BF16 but no AMX (matmul 0.5x: auto stays fp32 there), while the AMD EPYC
    of docs/reference.md §4 has 2.3x bf16 matmuls."""
    weight = next(model.parameters())
    have = weight.dtype
    if precision == "auto" and have != torch.float32:
        return model
    want = torch_dtype(resolve_precision(precision, weight.device.type))
    if want == have:
        return model
    with torch.no_grad():
        return copy.deepcopy(model).to(want)
