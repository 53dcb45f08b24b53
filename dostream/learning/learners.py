"""The learners: what one update of the learning cycle trains from the streams it is given. Knows no source and no gate.

The continual agent (`agent/loop.py`) and the server (`serve/learn.py`) call them through
`learning.cycle.update_once`; in the agent every learner acts on the same seeded episode sequence
with the same number of environment interactions, and they differ only in what an update trains:

| learner | an update trains | adapter |
|---|---|---|
| `none` | nothing (the no-learning baseline) | none |
| `interventional` | NLL on the world's tokens (the `interventional` view), via `train()` | rank `lora_r` |
| `observational` | NLL on every token but the context, the agent's own too, via `train()` | rank `lora_r` |
| `dapo` | reward only: DAPO on the agent's tokens, K samples of one item per group | rank `lora_r` |
| `dual` | DAPO → ranks 1..R/2 (the policy), world NLL → ranks R/2+1..R (the world model); each loss only its own half | rank R = `dual_rank` |
| `dual-shared` | the same two losses on one rank-R adapter, no isolation (the ablation) | rank R |

The reward learners (`REWARD_LEARNERS`) learn from groups: the loop plays each item K times in a
row (`group_size`), and an update's new episodes are its groups. DAPO's parts are
`learning/policy_gradient.py`'s (`make_rollouts`: group advantages with the soft overlong punishment;
`dynamic_sampling_filter`: a group whose outcomes are all equal carries no signal and is dropped;
the loop's interaction budget is fixed, so unlike DAPO's it does not sample more to refill;
`policy_loss`: clip-higher with separate ε_low/ε_high, the token-level mean; `policy_update`). The
behaviour policy's log-probs are the adapter in force's, which acted every new episode, so the
first pass is exactly on-policy; there is no replay for the policy (older episodes were acted by
other adapters), and with β = 0 (DAPO's choice) no reference model. Both losses use the loop's
`lr`; the policy takes `policy_iterations` steps over its groups, the world model `train()`'s
steps over the new and replayed episodes (`epochs`, `batch_size`), policy first (so its ratios
start at the acting policy's log-probs).

How `dual` keeps the halves apart. A rank-R LoRA is the sum of two rank-R/2 ones:
ΔW x = s·[B_p B_w][A_p; A_w] x = s·B_p A_p x + s·B_w A_w x. In training the halves are two PEFT
adapters of rank R/2, `policy` and `world`, both active (PEFT adds the outputs of active adapters),
each with the loop's scale s = lora_alpha/lora_r. Each phase marks only its own half trainable and
steps its own optimizer over only that half's weights: the other half receives no gradient and is
in no optimizer, so its weights are bit-identical after the step (no shared AdamW moment or weight
decay can reach them). Acting uses both halves. The update is saved as ONE rank-R PEFT adapter
(`adapter/`, loadable with `PeftModel.from_pretrained(base, DIR)` alone, which gives the loop's
logits): rows 0..R/2-1 of every `lora_A` and columns 0..R/2-1 of every `lora_B` are the policy,
the rest the world model (written down in `adapter/dual.json`). `dual-shared` and `dapo` are the
same code with one adapter (`default`) that both losses, or the one loss, train.

An update is a pure function of the episodes, the adapter in force and the seed, and its
candidate adapter is written atomically at the end: an update killed at any point is redone from
the start and ends with the same weights (the world phase's `train()` run under `world/` picks up
its own final checkpoint if the kill came after it; tested with SIGKILL).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dostream.learning.config import REWARD_LEARNERS, VIEW_LEARNERS, WORLD_VIEW
from dostream.stream import Stream


@dataclass
class Outcome:
    """What an update produced: the candidate adapter (None: nothing to learn, and why), metrics."""

    adapter: Path | None
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


def learn(
    cfg, tok, after: int, new: list[Stream], replayed: list[Stream], current: Path | None, out: Path, turn_budget: int
) -> Outcome:
    """One update of learner `cfg.learner` (a `learning.config.Update`) from the new episodes (and the
    replayed ones, for the NLL losses), starting from the adapter `current` (None: the base
    model); the candidate lands in `out/adapter`."""
    if cfg.learner in VIEW_LEARNERS:
        return learn_view(cfg, tok, after, new, replayed, current, out)
    if cfg.learner in REWARD_LEARNERS:
        return learn_reward(cfg, tok, after, new, replayed, current, out, turn_budget)
    raise ValueError(f"the {cfg.learner!r} learner does not update")


def update_seed(cfg, after: int) -> int:
    return cfg.seed * 1_000_003 + after


def _train_config(cfg, after: int, view: str, lora_r: int, lora_alpha: float):
    from dostream.config import SupervisedBlock, block_values
    from dostream.train import TrainConfig

    values = {**block_values(cfg, SupervisedBlock), "lora_r": lora_r, "lora_alpha": lora_alpha}
    return TrainConfig(
        model=cfg.model,
        view=view,
        **values,
        warmup_ratio=0.0,
        schedule="constant",
        seed=update_seed(cfg, after),
        save_every=1 << 30,  # only the end: a killed update is redone whole (it is a few steps)
        keep_checkpoints=1,
        progress=False,
    )


# -- the view learners: interventional, observational ------------------------------------------


def learn_view(cfg, tok, after, new, replayed, current, out) -> Outcome:
    """Today's loops: the new + replayed episodes under the learner's view, through `train()`,
    continuing the adapter in force (a fresh LoRA of rank `lora_r` before the first)."""
    from dostream.models import load_model
    from dostream.render import Renderer, encode_rows
    from dostream.stream import view_authors
    from dostream.train import train

    rows, stats = encode_rows(new + replayed, Renderer(tok), view_authors(cfg.learner), max_length=cfg.max_length)
    metrics: dict[str, Any] = {
        "new": len(new),
        "replayed": len(replayed),
        "rows": len(rows),
        "supervised_tokens": stats.supervised_tokens,
        "tokens": stats.tokens,
    }
    if not rows:
        return Outcome(None, "no supervised token in the update's streams", metrics)
    base = load_model(cfg.model, adapter=current, trainable=True)
    result = train(
        rows,
        _train_config(cfg, after, cfg.learner, cfg.lora_r, cfg.lora_alpha),
        out,
        model=base,
        pad_id=tok.pad_token_id,
        resume=True,
        extra_record={"method": f"agent_{cfg.learner}", "after_episodes": after},
    )
    metrics["train/loss"] = sum(m["train/loss"] for m in result.metrics) / max(1, len(result.metrics))
    metrics["train/steps"] = result.steps
    return Outcome(out / "adapter", "", metrics)


# -- the reward learners: dapo, dual, dual-shared ----------------------------------------------


def parts_of(cfg) -> dict[str, tuple[int, int]]:
    """The learner's adapters during training, each a slice [lo, hi) of the saved adapter's ranks."""
    if cfg.learner == "dapo":
        return {"default": (0, cfg.lora_r)}
    r = cfg.dual_rank
    if r < 2 or r % 2:
        raise ValueError(f"dual_rank must be even and >= 2, not {r}")
    if cfg.learner == "dual-shared":
        return {"default": (0, r)}
    return {"policy": (0, r // 2), "world": (r // 2, r)}


def loss_halves(learner: str) -> tuple[list[str], list[str]]:
    """(the adapters the policy loss trains, the adapters the world loss trains)."""
    if learner == "dual":
        return ["policy"], ["world"]
    if learner == "dual-shared":
        return ["default"], ["default"]
    return ["default"], []


_LORA = re.compile(r"\.lora_([AB])\.([^.]+)\.weight$")


def adapter_params(model, names: list[str]) -> dict[str, torch.nn.Parameter]:
    """The LoRA weights of the adapters `names`, by parameter name."""
    return {n: p for n, p in model.named_parameters() if (m := _LORA.search(n)) and m.group(2) in names}


def train_only(model, names: list[str]) -> list[torch.nn.Parameter]:
    """Mark exactly the LoRA weights of adapters `names` trainable (every other weight frozen, so
    no gradient reaches it); return them."""
    mine = adapter_params(model, names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in mine)
    return list(mine.values())


def _scale(cfg) -> float:
    return cfg.lora_alpha / cfg.lora_r


def _alpha(scale: float, r: int) -> float | int:
    a = scale * r
    return int(a) if float(a).is_integer() else a


def fresh_state(shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A fresh rank-`rank` LoRA, PEFT's default init drawn from `seed`: every A uniform in
    ±1/sqrt(fan_in) (kaiming-uniform with a = √5), every B zero, so the adapter starts as the base
    model. `shapes` are one part's (keys as PEFT saves them); dual and dual-shared draw the same."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        if ".lora_A." in key:
            fan_in = shapes[key][1]
            state[key] = (torch.rand((rank, fan_in), generator=g) * 2 - 1) / math.sqrt(fan_in)
        else:
            state[key] = torch.zeros((shapes[key][0], rank))
    return state


def slice_state(state: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Ranks [lo, hi) of a LoRA state: rows of every A, columns of every B."""
    return {k: (v[lo:hi] if ".lora_A." in k else v[:, lo:hi]).contiguous() for k, v in state.items()}


def build_model(cfg, state: dict[str, torch.Tensor] | None, seed: int):
    """The base model with the learner's adapters (`parts_of`), all active, holding `state` (a
    saved rank-R LoRA; None: a fresh one drawn from `seed`)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from dostream.models import load_model

    parts, scale = parts_of(cfg), _scale(cfg)
    rank = max(hi for _, hi in parts.values())
    model = None
    with torch.random.fork_rng():  # PEFT's own init draws from the global RNG; `state` replaces it
        for name, (lo, hi) in parts.items():
            lora = LoraConfig(
                r=hi - lo,
                lora_alpha=_alpha(scale, hi - lo),
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            if model is None:
                model = get_peft_model(load_model(cfg.model), lora, adapter_name=name)
            else:
                model.add_adapter(name, lora)
    model.base_model.set_adapter(list(parts))  # all active: their outputs add up to the rank-R adapter
    if state is None:
        first = get_peft_model_state_dict(model, adapter_name=next(iter(parts)))
        state = fresh_state({k: tuple(v.shape) for k, v in first.items()}, rank, seed)
    for name, (lo, hi) in parts.items():
        result = set_peft_model_state_dict(model, slice_state(state, lo, hi), adapter_name=name)
        bad = [k for k in result.unexpected_keys]
        if bad:
            raise ValueError(f"adapter state does not fit the model: {bad[:3]}")
    return model


def merged_state(model, cfg) -> dict[str, torch.Tensor]:
    """The learner's adapters as one rank-R LoRA state (A rows, B columns in `parts_of` order)."""
    from peft import get_peft_model_state_dict

    parts = [get_peft_model_state_dict(model, adapter_name=name) for name in parts_of(cfg)]
    return {
        k: torch.cat([p[k].detach().cpu() for p in parts], dim=0 if ".lora_A." in k else 1).contiguous()
        for k in parts[0]
    }


def save_adapter(model, cfg, out: Path) -> None:
    """Write the learner's adapters as one rank-R PEFT adapter in `out` (atomically), with
    `dual.json` naming which ranks are the policy and which the world model."""
    import copy

    from safetensors.torch import save_file

    from dostream.files import replace_dir

    parts = parts_of(cfg)
    rank = max(hi for _, hi in parts.values())
    lora = copy.deepcopy(model.peft_config[next(iter(parts))])
    lora.r, lora.lora_alpha = rank, _alpha(_scale(cfg), rank)
    state = merged_state(model, cfg)
    policy, world = loss_halves(cfg.learner)
    split = {
        "learner": cfg.learner,
        "rank": rank,
        "scale": _scale(cfg),
        "policy_ranks": [parts[policy[0]][0], parts[policy[0]][1]],
        "world_ranks": [parts[world[0]][0], parts[world[0]][1]] if world else None,
        "layout": "rank i is row i of every lora_A and column i of every lora_B (0-based, [lo, hi))",
    }

    def write(tmp: Path) -> None:
        tmp.mkdir()
        lora.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "dual.json").write_text(json.dumps(split, indent=1) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(out, write)


def load_state(adapter: Path | None) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    return None if adapter is None else load_file(str(Path(adapter) / "adapter_model.safetensors"))


def until_last_action(stream: Stream) -> Stream:
    """The stream up to its last agent turn: what the policy saw and did (the world's later
    answer carries no policy-gradient term)."""
    last = max((i for i, s in enumerate(stream.segments) if s.author == "agent"), default=-1)
    return Stream(stream.id, stream.segments[: last + 1], dict(stream.meta))


def episode_groups(new: list[Stream], k: int) -> list[list[Stream]]:
    """The new episodes as groups of K consecutive episodes of one item (how the loop acts)."""
    groups = [new[i : i + k] for i in range(0, len(new), k)]
    for g in groups:
        if len(g) != k or len({s.meta.get("group") for s in g}) != 1:
            raise ValueError(f"a group must be {k} episodes of one item: {[s.id for s in g]}")
    return groups


def policy_config(cfg, turn_budget: int, after: int):
    """The agent's DAPO as `learning/policy_gradient.py`'s config: clip-higher, token-level loss, overlong shaping."""
    from dostream.learning.policy_gradient import GRPOConfig

    return GRPOConfig(
        k=cfg.group_size,
        iterations=cfg.policy_iterations,
        lr=cfg.lr,
        beta=cfg.kl_beta,
        epsilon=cfg.clip_low,
        epsilon_high=cfg.clip_high,
        dapo=True,
        overlong_buffer=cfg.overlong_buffer,
        max_new_tokens=turn_budget,
        micro_batch=cfg.batch_size,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        seed=update_seed(cfg, after),
        progress=False,
    )


def policy_phase(model, rollouts, gcfg, names: list[str], pad: int) -> dict[str, Any]:
    """DAPO steps that move only the adapters `names` (their own AdamW, nothing else trainable)."""
    from dostream.learning.policy_gradient import policy_update, reference_logps
    from dostream.train import device_policy

    policy = device_policy("auto")  # train()'s device and precision
    model.to(policy.device)
    params = train_only(model, names)
    reference_logps(model, rollouts, pad, gcfg.micro_batch, policy.bf16, reference=gcfg.beta > 0)
    optimizer = torch.optim.AdamW(params, lr=gcfg.lr, weight_decay=0.0)
    model.train()
    return policy_update(model, optimizer, params, rollouts, pad, gcfg, policy.bf16)


def world_phase(model, rows, tcfg, names: list[str], out: Path, pad: int, extra: dict | None = None):
    """NLL steps on the world's tokens that move only the adapters `names`: `train()` builds its
    optimizer over the trainable weights, which are exactly those."""
    from dostream.train import train

    train_only(model, names)
    return train(rows, tcfg, out, model=model, pad_id=pad, resume=True, extra_record=extra)


def learn_reward(cfg, tok, after, new, replayed, current, out, turn_budget) -> Outcome:
    import shutil

    from dostream.learning.policy_gradient import dynamic_sampling_filter, make_rollouts
    from dostream.render import Renderer, encode_rows
    from dostream.stream import view_authors

    t0 = time.perf_counter()
    gcfg = policy_config(cfg, turn_budget, after)
    renderer = Renderer(tok, add_eos=False)
    groups = [
        make_rollouts(
            [until_last_action(s) for s in g],
            [float(s.meta.get("reward", 0.0)) for s in g],
            renderer,
            g[0].meta["group"],
            max_len=turn_budget,
            buffer=cfg.overlong_buffer,
        )
        for g in episode_groups(new, cfg.group_size)
    ]
    kept, dropped = dynamic_sampling_filter(groups)
    rollouts = [r for g in kept for r in g]
    policy_names, world_names = loss_halves(cfg.learner)
    rewards = [r.reward for g in groups for r in g]
    metrics: dict[str, Any] = {
        "new": len(new),
        "groups": len(groups),
        "groups_informative": len(kept),
        "groups_all_success": sum(1 for g in groups if all(r.reward > 0 for r in g)),
        "groups_all_fail": sum(1 for g in groups if all(r.reward <= 0 for r in g)),
        "rollout/reward": sum(rewards) / max(1, len(rewards)),
        "policy/action_tokens": sum(sum(r.action[1:]) for r in rollouts),
    }
    rows: list[dict] = []
    if world_names:
        rows, stats = encode_rows(new + replayed, Renderer(tok), view_authors(WORLD_VIEW), max_length=cfg.max_length)
        metrics.update(
            {
                "replayed": len(replayed),
                "rows": len(rows),
                "supervised_tokens": stats.supervised_tokens,
                "tokens": stats.tokens,
            }
        )
    if not rollouts and not rows:
        why = "every group's outcomes were equal (no reward signal)"
        return Outcome(None, why + ("" if not world_names else " and no world token"), metrics)
    seed = update_seed(cfg, after)
    model = build_model(cfg, load_state(current), seed)
    pad = tok.pad_token_id
    if rollouts:
        stats = policy_phase(model, rollouts, gcfg, policy_names, pad)
        metrics.update({f"policy/{k.split('/', 1)[-1]}": v for k, v in stats.items()})
    if rows:
        rank = max(hi for _, hi in parts_of(cfg).values())
        tcfg = _train_config(cfg, after, WORLD_VIEW, rank, _alpha(_scale(cfg), rank))
        extra = {"method": f"agent_{cfg.learner}_world", "after_episodes": after, "trains": world_names}
        result = world_phase(model, rows, tcfg, world_names, out / "world", pad, extra)
        model = result.model
        metrics["world/loss"] = sum(m["train/loss"] for m in result.metrics) / max(1, len(result.metrics))
        metrics["world/steps"] = result.steps
        # The world phase's own copies (two-adapter form, checkpoints) are not needed once the
        # learner's adapter is written: the update is redone whole if it is killed before that.
    save_adapter(model, cfg, out / "adapter")
    for leftover in ("checkpoints", "adapter"):
        shutil.rmtree(out / "world" / leftover, ignore_errors=True)
    metrics["time/update_s"] = time.perf_counter() - t0
    return Outcome(out / "adapter", "", metrics)
