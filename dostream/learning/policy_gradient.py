"""The policy-gradient core: GRPO's group-standardised advantages (the paper's Eq. 10), DAPO's
soft overlong punishment and dynamic-sampling filter, the clipped surrogate + β·k3 loss (Eq. 11),
the sampling policy's and the reference's log-probs, and the update step.

A library: the STEM recipe (`methods/grpo.py`) and the continual agent's reward learners
(`learning/learners.py`) both build on it; it knows nothing of a task. A rollout is one attempt,
rendered (its `agent` tokens carry the loss: the renderer knows who wrote every token), with
the advantage of its group.

>>> [round(a, 3) for a in group_advantages([1, 0, 0, 0])]
[1.732, -0.577, -0.577, -0.577]
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dostream.config import LoraBlock, keeps_old_names, like, opt
from dostream.device import PRECISIONS, autocast
from dostream.render import Renderer
from dostream.scoring import logprobs_at
from dostream.stream import Stream


@keeps_old_names
@dataclass
class GRPOConfig(LoraBlock):
    """GRPO/DAPO. The LoRA/optimiser fields (lr, constant here; lora_r, lora_alpha) are the shared
    `config.LoraBlock`."""

    groups: int = opt(50, "prompt budget: prompts of D_agent sampled, K attempts each")
    k: int = opt(8, "attempts per prompt (the group size K)")
    groups_per_step: int = opt(1, "groups per optimizer step (the paper: 1)")
    iterations: int = opt(2, "optimisation passes over each sampled batch (μ); the ratio moves from 1 after the first")
    lr: float = like(LoraBlock, "lr", 1e-4)
    beta: float = opt(0.04, "weight of the KL penalty to SFT-1 (k3 estimator)")
    epsilon: float = opt(0.2, "clip range: ρ is clipped to [1-ε, 1+ε] (1+ε_high with dapo)")
    epsilon_high: float = opt(0.28, "DAPO's clip-higher upper range (used only with dapo)")
    dapo: bool = opt(False, "DAPO: clip-higher, dynamic sampling (drop flat groups), token-level loss")
    overlong_buffer: int = opt(
        0,
        "DAPO's soft overlong punishment: an attempt within this many tokens of max_new_tokens loses up to 1 (0: off)",
    )
    temperature: float = opt(1.0, "sampling temperature")
    max_new_tokens: int = opt(128, "tokens per attempt")
    backend: str = opt(
        "auto",
        "rollouts' sampling backend: torch (dostream's engine), vllm (a kept vLLM engine, the adapter a "
        "per-call LoRA: docs/engines.md) or auto (vLLM on a CUDA GPU when installed)",
        choices=("auto", "torch", "vllm"),
    )
    micro_batch: int = opt(8, "attempts per forward/backward")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm (0: off)")
    precision: str = opt(
        "auto", "autocast precision: auto (bf16 where it measures faster here), fp32, bf16", choices=PRECISIONS
    )
    seed: int = opt(0, "seed for the prompt choice, LoRA init and samples")
    tools: str = opt("none", "none or calculator")
    progress: bool = opt(True, "show a progress bar")


# -- the pieces -----------------------------------------------------------------------------


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """Eq. 10: (r_k - mean) / sqrt(population variance + eps). A flat group gives zeros.

    >>> [round(a, 3) for a in group_advantages([1, 0, 0, 0])]
    [1.732, -0.577, -0.577, -0.577]
    """
    n = len(rewards)
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / n
    return [(r - mean) / (var + eps) ** 0.5 for r in rewards]


def is_flat(rewards: list[float]) -> bool:
    return max(rewards) == min(rewards)


@dataclass
class Rollout:
    """One attempt ready for the loss: ids, which positions are the agent's, its advantage."""

    input_ids: list[int]
    action: list[bool]  # per token: sampled by the agent (carries the loss)
    advantage: float
    reward: float
    group: int
    old_logp: torch.Tensor | None = None  # per action token, the sampling policy's log-prob
    ref_logp: torch.Tensor | None = None  # per action token, SFT-1's log-prob


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), added to the reward: 0 up to
    `max_len - buffer` tokens, then falling linearly to -1 at `max_len`, and -1 beyond. `buffer` 0: off.

    >>> [overlong_penalty(n, 24, 8) for n in (16, 20, 24, 25)]
    [0.0, -0.5, -1.0, -1.0]
    """
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    if length >= max_len:
        return -1.0
    return (max_len - buffer - length) / buffer


def longest_turn(stream: Stream) -> int:
    """Tokens in the stream's longest agent turn (what the overlong punishment measures)."""
    return max((len(s.token_ids or ()) for s in stream.segments if s.author == "agent"), default=0)


def make_rollouts(
    group: list[Stream], rewards: list[float], renderer: Renderer, gid: int, *, max_len: int = 0, buffer: int = 0
) -> list[Rollout]:
    """One group of attempts at the same item as rollouts: each stream rendered (its agent tokens
    carry the loss), its advantage from the group's rewards, each shaped by `overlong_penalty`
    when `buffer` > 0. `Rollout.reward` keeps the unshaped reward: dynamic sampling asks whether
    the *outcomes* differ (DAPO filters on accuracy), not the shaped values."""
    shaped = [r + overlong_penalty(longest_turn(s), max_len, buffer) for s, r in zip(group, rewards)]
    out = []
    for s, a, r in zip(group, group_advantages(shaped), rewards):
        rendered = renderer.render(s)
        out.append(Rollout(rendered.input_ids, [au == "agent" for au in rendered.authors], a, r, gid))
    return out


def dynamic_sampling_filter(groups: list[list[Rollout]]) -> tuple[list[list[Rollout]], int]:
    """DAPO's dynamic sampling: drop groups whose rewards are all equal. Returns (kept, dropped)."""
    kept = [g for g in groups if not is_flat([r.reward for r in g])]
    return kept, len(groups) - len(kept)


def _batch(rollouts: list[Rollout], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad rollouts into `input_ids`, `attention_mask` and `action` (the tokens scored), on `device`."""
    width = max(len(r.input_ids) for r in rollouts)
    ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rollouts), width), dtype=torch.long)
    act = torch.zeros((len(rollouts), width), dtype=torch.bool)
    for b, r in enumerate(rollouts):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids)
        attn[b, :n] = 1
        act[b, :n] = torch.tensor(r.action)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "action": act.to(device)}


def _action_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token_t | tokens_<t) at the action positions, flattened row by row (`scoring.logprobs_at`)."""
    return logprobs_at(model, batch["input_ids"], batch["attention_mask"], batch["action"])


def policy_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor,
    adv: torch.Tensor,
    lengths: list[int],
    cfg: GRPOConfig,
    norm: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate + β·k3 over one micro-batch's action tokens (flattened, `lengths`
    tokens per attempt). `norm` is the step's attempt count (GRPO) or action-token count (DAPO),
    so micro-batches add up to the step's mean exactly."""
    ratio = torch.exp(logp - old)
    high = cfg.epsilon_high if cfg.dapo else cfg.epsilon
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - cfg.epsilon, 1 + high) * adv)
    delta = ref - logp
    k3 = torch.exp(delta) - delta - 1
    per_token = -surrogate + cfg.beta * k3
    if cfg.dapo:
        loss = per_token.sum() / norm
    else:
        loss = torch.stack([t.mean() for t in per_token.split(lengths)]).sum() / norm
    clipped = ((ratio < 1 - cfg.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return loss, {
        "kl": float(k3.detach().mean()),
        "clip_frac": float(clipped.float().mean()),
        "ratio_max": float(ratio.detach().max()),
    }


@torch.no_grad()
def reference_logps(
    model, rollouts: list[Rollout], pad: int, micro: int, bf16: bool, *, reference: bool = True
) -> None:
    """The sampling policy's and the reference's (the model with its adapters disabled: SFT-1 in
    GRPO, the base model in the agent) log-probs of every action token, once, before any update.
    `reference=False` skips the reference forward where β = 0 (its log-probs are then the sampling
    policy's, so the k3 term, weighted 0, reports the drift from the sampling policy)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    for k in range(0, len(rollouts), micro):
        rs = rollouts[k : k + micro]
        batch = _batch(rs, pad, device)
        with autocast(device, bf16):
            old = _action_logprobs(model, batch)
            if reference:
                with model.disable_adapter():  # SFT-1 is the merged base: the reference policy
                    ref = _action_logprobs(model, batch)
            else:
                ref = old
        lengths = [int(n) for n in batch["action"][:, 1:].sum(1)]
        for r, o, f in zip(rs, old.split(lengths), ref.split(lengths)):
            r.old_logp, r.ref_logp = o.float(), f.float()
    model.train(was)


def policy_update(model, optimizer, trainable, rollouts: list[Rollout], pad: int, cfg: GRPOConfig, bf16: bool) -> dict:
    """`cfg.iterations` optimizer steps on one batch of rollouts (`reference_logps` first). Only
    the parameters that require a gradient move; `trainable` are the ones clipped."""
    t0 = time.perf_counter()
    rollouts = [r for r in rollouts if r.old_logp is not None and len(r.old_logp) > 0]
    norm = float(sum(len(r.old_logp) for r in rollouts)) if cfg.dapo else float(len(rollouts))
    stats: dict[str, float] = {}
    device = next(model.parameters()).device
    for it in range(cfg.iterations):
        parts = []
        for k in range(0, len(rollouts), cfg.micro_batch):
            rs = rollouts[k : k + cfg.micro_batch]
            batch = _batch(rs, pad, device)
            lengths = [len(r.old_logp) for r in rs]
            with autocast(device, bf16):
                logp = _action_logprobs(model, batch)
            adv = torch.cat([torch.full((n,), r.advantage, device=device) for r, n in zip(rs, lengths)])
            loss, s = policy_loss(
                logp, torch.cat([r.old_logp for r in rs]), torch.cat([r.ref_logp for r in rs]), adv, lengths, cfg, norm
            )
            loss.backward()
            parts.append((float(loss.detach()), s))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it == cfg.iterations - 1:
            stats = {
                "train/loss": sum(p[0] for p in parts),
                "train/kl": sum(p[1]["kl"] for p in parts) / len(parts),
                "train/clip_frac": sum(p[1]["clip_frac"] for p in parts) / len(parts),
                "train/ratio_max": max(p[1]["ratio_max"] for p in parts),
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            }
    stats["time/step_s"] = time.perf_counter() - t0
    stats["train/attempts"] = len(rollouts)
    return stats
