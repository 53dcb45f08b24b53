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

The pieces (`GRPOConfig`, `group_advantages`, `overlong_penalty`, `make_rollouts`,
`dynamic_sampling_filter`, `policy_loss`, `reference_logps`, `policy_update`) are the library's
`learning/policy_gradient.py`, which the continual agent's reward learners use too; this file is
the STEM recipe: the prompts, the verifier's reward and the loop.

Only `agent` tokens carry the loss: in the calculator variant the tool's outputs inside an
attempt are context (the renderer knows who wrote every token; no string search).

>>> model, info = train_grpo(problems, tok, GRPOConfig(groups=50), "runs/sft1/merged", "runs/grpo")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dostream.config import LoraBlock, atomic_write_text, block_values, write_run_record
from dostream.envs.stem import Problem
from dostream.learning.policy_gradient import (
    GRPOConfig,
    Rollout,
    dynamic_sampling_filter,
    is_flat,
    make_rollouts,
    policy_update,
    reference_logps,
)
from dostream.methods.attempts import attempt, until_verdict
from dostream.models import load_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig
from dostream.sampling.vllm_backend import _use_vllm
from dostream.stream import Stream
from dostream.train import TrainConfig, device_policy, prepare_model


def to_rollouts(
    group: list[Stream], renderer: Renderer, gid: int, *, max_len: int = 0, buffer: int = 0
) -> list[Rollout]:
    """A group of STEM attempts: reward 1 where the first attempt is correct, rendered up to the
    verdict (exactly the ids the policy saw and sampled)."""
    rewards = [1.0 if s.meta["first_correct"] else 0.0 for s in group]
    return make_rollouts([until_verdict(s) for s in group], rewards, renderer, gid, max_len=max_len, buffer=buffer)


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
    policy = device_policy(cfg.precision)  # train()'s: batches go to the model's device, autocast there
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
        # the rollouts' engine as resolved (`auto`: vLLM only for a model on a CUDA GPU)
        "backend": "vllm" if _use_vllm(model, SamplingConfig(backend=cfg.backend)) else "torch",
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
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 100_003 + start,
            backend=cfg.backend,
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
