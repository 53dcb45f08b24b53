"""A token per row from last-position logits, and each row's own random stream: knows nothing of
models, caches or the rows' prompts.

Nucleus sampling is exact but rarely sorts the vocabulary: the nucleus is looked for among the
top 64 tokens, then 1024, and only rows whose nucleus is larger still are sorted in full.
"""

from __future__ import annotations

import torch

from dostream.sampling.config import SamplingConfig

_TOPK_FIRST = 64  # nucleus candidates tried first (a trained model's nucleus is usually smaller)


def _row_seed(seed: int, row: int) -> int:
    return (seed * 1_000_003 + row) % (2**63)


def _row_generator(seed: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(_row_seed(seed, row))


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
