"""The dual-LoRA experiment: does a world-model half that learns from what the services say beat
reward-only RL on the support calls? (docs/reference.md §3)

Every learner of `learning/learners.py` (none, interventional, observational, dapo, dual,
dual-shared) acts on the same seeded sequence of support calls, each call played K times in a row,
with the same number of calls in all, for each environment (`support`: the refusal in the
service's words; `support-framed`: in the words the agent's own turn begins with) and each seed
(another world: other rules, other calls). Measured, per learner: acting success over the
episodes, held-out success (greedy, calls with goals never trained on) every `eval_every`
episodes, the episodes until held-out success first reaches `threshold` (the seed article's
sample-efficiency claim as a number, with intervals over seeds), and the rule probe (does the
final adapter rank the required detail first where the agent acts, or only where the service
speaks?).

    dostream reproduce dual-lora --preset smoke|quick [--seeds N] [--out DIR] [--FIELD VALUE ...]

Layout: `OUT/<env>/seed-<s>/` is an agent run directory (one loop per learner, `dostream report`
rebuilds its own report); `OUT/stages/` marks each (env, seed)'s loops and probe complete, so
rerunning the command resumes (the loops themselves resume episode by episode). The report
(`report.md`, `results.json`, `figures/`) is written from those files by `report.py`.

This module is the library (`DualLoraConfig`, `PRESETS`, `resolve_preset`, `run`); the command
lives in `dostream/cli/reproduce.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dostream.agent.loop import AgentConfig, run_learners
from dostream.config import SupervisedBlock, check_run_dir, like, opt, write_run_record
from dostream.experiments.stages import Stages
from dostream.learning.config import LEARNERS

EXPERIMENT = "dual-lora"
ENVS = ("support", "support-framed")
MAY_CHANGE = ("seeds", "progress")  # a rerun may add seeds or hide its progress bars


@dataclass
class DualLoraConfig(SupervisedBlock):
    """One run of the experiment; every field is a flag of `dostream reproduce dual-lora`. The
    loop's fields are the agent's (`AgentConfig`, the same help); the LoRA/optimiser/batch fields
    (`config.SupervisedBlock`: lr, lora_r and lora_alpha of the one-loss learners' adapters, the
    NLL updates' epochs, batch and row length) are every learner's."""

    model: str = like(AgentConfig, "model", "smollm2")
    envs: list[str] = opt(list(ENVS), f"environments, each with its own runs: {', '.join(ENVS)}")
    learners: list[str] = opt(list(LEARNERS), f"learners, in the order they run: {', '.join(LEARNERS)}")
    seeds: int = opt(3, "seeds 0..N-1: each another world (rules, calls), samples and adapter inits")
    episodes: int = like(AgentConfig, "episodes", 192)
    update_every: int = like(AgentConfig, "update_every", 16)
    group_size: int = like(AgentConfig, "group_size", 4)
    replay: float = like(AgentConfig, "replay", 1.0)
    epochs: int = like(SupervisedBlock, "epochs", 2)
    max_length: int = like(SupervisedBlock, "max_length", 512)
    lora_r: int = like(SupervisedBlock, "lora_r", 32)
    lora_alpha: int = like(SupervisedBlock, "lora_alpha", 64)
    dual_rank: int = like(AgentConfig, "dual_rank", 64)
    policy_iterations: int = like(AgentConfig, "policy_iterations", 4)
    clip_low: float = like(AgentConfig, "clip_low", 0.2)
    clip_high: float = like(AgentConfig, "clip_high", 0.28)
    kl_beta: float = like(AgentConfig, "kl_beta", 0.0)
    overlong_buffer: int = like(AgentConfig, "overlong_buffer", 6)
    gate_control: int = like(AgentConfig, "gate_control", 16)
    gate_learned: int = like(AgentConfig, "gate_learned", 8)
    gate_tolerance: float = like(AgentConfig, "gate_tolerance", 0.1)
    eval_every: int = like(AgentConfig, "eval_every", 48)
    eval_n: int = like(AgentConfig, "eval_n", 48)
    temperature: float = like(AgentConfig, "temperature", 0.7)
    max_new_tokens: int = like(AgentConfig, "max_new_tokens", 0)
    sample_batch: int = like(AgentConfig, "sample_batch", 32)
    threshold: float = opt(0.5, "held-out success the episodes-to-threshold count runs to")
    probe_tasks: int = opt(48, "fresh held-out calls the rule probe asks each final adapter")
    progress: bool = like(AgentConfig, "progress", True)

    def __post_init__(self) -> None:
        bad = [e for e in self.envs if e not in ENVS] + [x for x in self.learners if x not in LEARNERS]
        if bad or not self.envs or not self.learners:
            raise ValueError(f"envs are {', '.join(ENVS)}; learners are {', '.join(LEARNERS)}; not {bad}")


PRESETS: dict[str, DualLoraConfig] = {
    # CI: the tiny random model, every learner, one update each, the report; seconds.
    "smoke": DualLoraConfig(
        model="tiny",
        envs=["support"],
        seeds=2,
        episodes=8,
        update_every=4,
        group_size=2,
        epochs=1,
        batch_size=4,
        lora_r=2,
        lora_alpha=4,
        dual_rank=4,
        policy_iterations=1,
        gate_control=1,
        gate_learned=1,
        eval_every=8,
        eval_n=2,
        max_new_tokens=6,
        probe_tasks=2,
        progress=False,
    ),
    # The embedded SmolLM2-135M, every learner, 3 seeds, sized from timing runs to 25
    # minutes on 2 quiet CPU cores (README, "Dual LoRA"): support-framed only (where the README's
    # interventional loop learned to act on what the services said; `--envs support
    # support-framed` adds the other and doubles the time), 16 calls x 4 samples, 3 updates, a
    # small gate and held-out set. The NLL and policy steps are most of the time: a first version
    # (16 held-out calls, a 6-call gate, replay 0.5, 2 policy passes, 12 probe calls) took 35
    # minutes, a second (12 / 4 / 0.25 / 2 / 8) 31 minutes quiet. lr 1e-3 (not tuned): 3 updates of
    # 3 steps at the agent's 2e-4 would move an adapter too little to show anything.
    "quick": DualLoraConfig(
        envs=["support-framed"],
        episodes=64,
        update_every=16,
        group_size=4,
        replay=0.25,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        lora_r=32,
        lora_alpha=64,
        dual_rank=64,
        policy_iterations=1,
        gate_control=4,
        gate_learned=2,
        eval_every=16,
        eval_n=12,
        probe_tasks=6,
    ),
}


def resolve_preset(name: str, **overrides) -> DualLoraConfig:
    """Preset `name` with some fields changed, e.g. `resolve_preset("smoke", seeds=1)`."""
    return dataclasses.replace(PRESETS[name], **overrides)


def agent_config(cfg: DualLoraConfig, env: str, seed: int) -> AgentConfig:
    """The loop's config for one environment and seed: the experiment's values of the agent's fields."""
    shared = {f.name for f in dataclasses.fields(AgentConfig)} & {f.name for f in dataclasses.fields(cfg)}
    return AgentConfig(**{k: getattr(cfg, k) for k in shared}, env=env, seed=seed, learner=cfg.learners[0])


def seed_dir(out: Path, env: str, seed: int) -> Path:
    return Path(out) / env / f"seed-{seed}"


def run(cfg: DualLoraConfig, out: str | Path, preset: str = "custom") -> Path:
    """Seeds 0..N-1, each environment, every learner; then each run's rule probe. Cached stages
    under `out/stages/`; returns the run directory."""
    from dostream.agent.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_dir(out, cfg, experiment=EXPERIMENT, may_change=MAY_CHANGE)
    write_run_record(out, cfg, {"preset": preset}, experiment=EXPERIMENT)
    stages = Stages(out)
    for seed in range(cfg.seeds):
        for env in cfg.envs:
            d = seed_dir(out, env, seed)

            def loops(_: Path, env=env, seed=seed, d=d) -> dict:
                summaries = run_learners(
                    agent_config(cfg, env, seed),
                    cfg.learners,
                    d,
                    resume=True,
                    record={
                        "command": f"dostream reproduce dual-lora ({env}, seed {seed})",
                        "probe_tasks": cfg.probe_tasks,
                    },
                )
                return {
                    x: {"successes": s["successes"], "episodes": s["episodes"], "seconds": s["seconds"]}
                    for x, s in summaries.items()
                }

            stages.run(f"loops-{env}-s{seed}", loops)
            # The agent's own report of this run: its table, figure and the rule probe (probe.json).
            stages.run(f"probe-{env}-s{seed}", lambda _, d=d: {"report": str(write_report(d))})
    return out
