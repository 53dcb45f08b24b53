"""SFT + GRPO (the paper's Eq. 10-11), and its DAPO variant (`dapo=True`).

From SFT-1 (merged) with a fresh LoRA adapter, for each step:

1. take `groups_per_step` prompts of D_agent and sample K attempts each from the *current* policy
   (on-policy), through the same environment as every other method (exact sampled ids);
2. reward r = 1 if the verifier accepts the attempt, else 0; the group-standardised advantage of
   Eq. 10, A_k = (r_k - mean(r)) / sqrt(var(r) + 1e-6) (population variance, eps inside the root:
   the paper's formula), the same for every token of attempt k. A flat group (all rewards equal:
   all right or all wrong) has A = 0 and carries no preference signal;
3. the per-token log-probs of the sampling policy (`old`) and of the reference SFT-1 (the same
   model with its adapter disabled) are computed once, right after sampling;
4. `iterations` optimisation passes over the batch minimise, per agent token,
       -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) + β k3,     ρ = exp(logp - logp_old),
       k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1  (an unbiased, non-negative KL estimate);
   GRPO averages over each attempt's tokens, then over attempts; a step whose groups are all flat
   is skipped (no reward signal), as in the paper (50 groups: 24 flat, 26 updates).

DAPO (Yu et al. 2025) changes three things, nothing else: clip-higher (ε_high > ε_low), dynamic
sampling (flat groups are dropped and sampling goes on until `groups_per_step` informative
groups fill the step, within the same prompt budget), and a token-level loss (the mean over all
agent tokens of the step, so long attempts are not down-weighted). Its fourth part, the soft
overlong punishment (`overlong_penalty`), is off unless `overlong_buffer` > 0.

The pieces are functions the continual agent's reward learners use too (`agent/learners.py`):
`group_advantages`, `overlong_penalty`, `make_rollouts`, `dynamic_sampling_filter`,
`policy_loss`, `reference_logps` and `policy_update`.

Only `agent` tokens carry the loss: in the calculator variant the tool's outputs inside an
attempt are context (the renderer knows who wrote every token; no string search).

>>> model, info = train_grpo(problems, tok, GRPOConfig(groups=50), "runs/sft1/merged", "runs/grpo")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dostream.config import LoraBlock, atomic_write_text, block_values, like, opt, write_run_record
from dostream.envs.stem import Problem
from dostream.methods.attempts import attempt, until_verdict
from dostream.models import load_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig
from dostream.scoring import logprobs_at
from dostream.stream import Stream
from dostream.train import TrainConfig, autocast, device_policy, prepare_model


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
    micro_batch: int = opt(8, "attempts per forward/backward")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm (0: off)")
    bf16: str = opt("auto", "bf16 autocast: auto, on, off", choices=("auto", "on", "off"))
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


def to_rollouts(
    group: list[Stream], renderer: Renderer, gid: int, *, max_len: int = 0, buffer: int = 0
) -> list[Rollout]:
    """A group of STEM attempts: reward 1 where the first attempt is correct, rendered up to the
    verdict (exactly the ids the policy saw and sampled)."""
    rewards = [1.0 if s.meta["first_correct"] else 0.0 for s in group]
    return make_rollouts([until_verdict(s) for s in group], rewards, renderer, gid, max_len=max_len, buffer=buffer)


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


# -- the loop -------------------------------------------------------------------------------


def train_grpo(problems: list[Problem], tok, cfg: GRPOConfig, sft1_dir: str | Path, out: str | Path):
    """Run GRPO (or DAPO) from the merged SFT-1 model; write OUT/adapter, OUT/metrics.jsonl and
    OUT/rollouts.jsonl. Returns (model, info) where info counts groups, flat groups and updates."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a rerun of an interrupted stage starts over
    torch.manual_seed(cfg.seed)
    train_cfg = TrainConfig(model=str(sft1_dir), **block_values(cfg, LoraBlock), seed=cfg.seed)
    policy = device_policy(cfg.bf16)  # train()'s: batches go to the model's device, autocast there
    model = prepare_model(train_cfg, load_model(str(sft1_dir))).to(policy.device)
    use_bf16 = policy.bf16
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    renderer = Renderer(tok, add_eos=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = random.Random(f"grpo:{cfg.seed}").sample(problems, min(cfg.groups, len(problems)))
    info = {
        "groups": 0,
        "flat_groups": 0,
        "flat_all_correct": 0,
        "flat_all_wrong": 0,
        "updates": 0,
        "skipped_steps": 0,
        "dropped_groups": 0,
        "samples": 0,
        "mean_reward": 0.0,
        "tokens": 0,
        "action_tokens": 0,
        "variant": "dapo" if cfg.dapo else "grpo",
    }
    metrics, rollout_log, buffer = [], [], []
    rewards_seen: list[float] = []
    bar = tqdm(
        total=len(prompts),
        desc="DAPO" if cfg.dapo else "GRPO",
        unit="group",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    model.train()
    for start in range(0, len(prompts), cfg.groups_per_step):
        chunk = prompts[start : start + cfg.groups_per_step]
        sampling = SamplingConfig(
            temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + start
        )
        flat_list = [p for p in chunk for _ in range(cfg.k)]
        ids = [f"{p.id}/g{start + g}/k{j}" for g, p in enumerate(chunk) for j in range(cfg.k)]
        streams = attempt(model, tok, flat_list, sampling, tools=cfg.tools, ids=ids, progress=False)
        model.train()
        shaping = {"max_len": cfg.max_new_tokens, "buffer": cfg.overlong_buffer if cfg.dapo else 0}
        groups = [
            to_rollouts(streams[g * cfg.k : (g + 1) * cfg.k], renderer, start + g, **shaping) for g in range(len(chunk))
        ]
        for g, group in enumerate(groups):
            rewards = [r.reward for r in group]
            rewards_seen += rewards
            info["groups"] += 1
            if is_flat(rewards):
                info["flat_groups"] += 1
                info["flat_all_correct" if rewards[0] == 1.0 else "flat_all_wrong"] += 1
            for s, r in zip(streams[g * cfg.k : (g + 1) * cfg.k], group):
                info["tokens"] += len(r.input_ids)
                info["action_tokens"] += sum(r.action[1:])
                rollout_log.append(
                    {
                        "id": s.id,
                        "reward": r.reward,
                        "advantage": r.advantage,
                        "text": "".join(x.text for x in until_verdict(s).segments if x.author in ("agent", "tool")),
                    }
                )
        bar.update(len(chunk))
        if cfg.dapo:
            groups, dropped = dynamic_sampling_filter(groups)
            info["dropped_groups"] += dropped
        reference_logps(model, [r for g in groups for r in g], pad, cfg.micro_batch, use_bf16)
        buffer += groups
        last = start + cfg.groups_per_step >= len(prompts)
        while buffer and (len(buffer) >= cfg.groups_per_step or last or not cfg.dapo):
            step_groups, buffer = buffer[: cfg.groups_per_step], buffer[cfg.groups_per_step :]
            if all(is_flat([r.reward for r in g]) for g in step_groups):
                info["skipped_steps"] += 1  # no reward signal: GRPO takes no step (DAPO never gets here)
                continue
            m = policy_update(model, optimizer, trainable, [r for g in step_groups for r in g], pad, cfg, use_bf16)
            info["updates"] += 1
            m.update(
                {
                    "step": info["updates"],
                    "groups_seen": info["groups"],
                    "rollout/reward": sum(r.reward for g in step_groups for r in g) / sum(len(g) for g in step_groups),
                }
            )
            metrics.append(m)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
        bar.set_postfix(updates=info["updates"], flat=info["flat_groups"])
    bar.close()
    info["samples"] = len(rewards_seen)
    info["mean_reward"] = sum(rewards_seen) / max(1, len(rewards_seen))
    model.save_pretrained(out / "adapter")
    atomic_write_text(out / "rollouts.jsonl", "".join(json.dumps(r) + "\n" for r in rollout_log))
    write_run_record(out, cfg, {"info": info}, experiment="grpo")
    return model, info


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
