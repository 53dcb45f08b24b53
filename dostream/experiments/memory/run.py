"""The memory experiment: does a memory the world taught help an agent beside (or instead of) its
weights, and is a memory that trusts the agent's own claims worse? (issue 34, item 7)

Every arm acts on the same seeded episode sequence of each environment, for each seed:

| arm | learns from its episodes by |
|---|---|
| `none` | nothing: the base model acts and is evaluated |
| `memory` | notes only: each acting block is distilled into a memory (`agent run --memory`), each episode opens with the notes retrieved for it |
| `weights` | interventional updates only (the world's tokens supervised, the agent's masked), gated |
| `both` | both of the above |
| `consolidated` | `both`'s end state, its memory consolidated into its adapter (`memory.consolidate`, one gated interventional update on the notes' cited world segments), then evaluated **with the memory removed** |
| `trusting` | notes only, from an **agent-trusting** memory: the observational control, where the agent's own claims count as evidence too (`TRUSTING` below; nowhere else) |

Measured per arm: acting success over the episodes (success against the number of interactions),
greedy held-out success every `eval_every` episodes (held-out items never acted on), and for
`consolidated` and `both` the held-out success with the memory removed (retention); per seed, the
interference on the STEM test set (`_interference`: the log-likelihood of STEM oracle solutions
under each learning arm's final adapter against the base model's). Intervals are Student-t over
seeds (`report.py`).

    dostream reproduce memory --preset smoke|quick [--seeds N] [--out DIR] [--FIELD VALUE ...]

Layout: `OUT/<env>/seed-<s>/<arm>/` is an agent run directory (`both/consolidated/` holds the
consolidation's adapters); `OUT/stages/` marks each (env, seed, arm) complete, so rerunning the
command resumes (a loop itself resumes episode by episode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dostream.agent.loop import Agent, AgentConfig
from dostream.config import SupervisedBlock, check_run_dir, like, opt, write_run_record
from dostream.experiments.stages import Stages
from dostream.memory.store import EVIDENCE_AUTHORS

EXPERIMENT = "memory"
ENVS = ("support", "tutor", "discount", "airline")
ARMS = ("none", "memory", "weights", "both", "consolidated", "trusting")
MAY_CHANGE = ("seeds", "progress", "stem_n")  # stem_n: a run from before the interference stage adds it


# THE OBSERVATIONAL CONTROL, for this experiment's `trusting` arm only: its memory is opened with
# these evidence authors (`Memory(evidence_authors=)`), so distillation takes the agent's own claims
# as cases and the memory admits notes that cite them. Every other memory keeps the default and
# refuses them (tests/experiments/test_memory_experiment.py checks both).
TRUSTING = frozenset(EVIDENCE_AUTHORS | {"agent"})


class ExperimentAgent(Agent):
    """The continual agent of `agent run --memory`, with the experiment's distillation settings
    (`distill_config`: how many held-out and other streams admission scores, the CPU's main cost)
    and, for the `trusting` arm only, its memory taking the agent's claims as evidence (`TRUSTING`).
    The point reached is kept where `agent/memory.py` keeps it, so a killed loop distils what it had not."""

    def __init__(self, *args, distill_config=None, trusting: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_config, self.trusting = distill_config, trusting
        if trusting:
            self.memory.evidence_authors = TRUSTING


@dataclass
class MemoryExperimentConfig(SupervisedBlock):
    """One run of the experiment; every field is a flag of `dostream reproduce memory`. The loop's
    fields are the agent's (`AgentConfig`, the same help)."""

    model: str = like(AgentConfig, "model", "smollm2")
    envs: list[str] = opt(list(ENVS), f"environments, each with its own runs: {', '.join(ENVS)}")
    arms: list[str] = opt(list(ARMS), f"arms, in the order they run: {', '.join(ARMS)} (consolidated needs both)")
    seeds: int = opt(3, "seeds 0..N-1: each another episode sequence, samples and adapter inits")
    episodes: int = like(AgentConfig, "episodes", 48)
    update_every: int = like(AgentConfig, "update_every", 16)
    memory_k: int = like(AgentConfig, "memory_k", 4)
    replay: float = like(AgentConfig, "replay", 1.0)
    epochs: int = like(SupervisedBlock, "epochs", 2)
    max_length: int = like(SupervisedBlock, "max_length", 256)
    lora_r: int = like(SupervisedBlock, "lora_r", 16)
    lora_alpha: int = like(SupervisedBlock, "lora_alpha", 32)
    gate_control: int = like(AgentConfig, "gate_control", 4)
    gate_learned: int = like(AgentConfig, "gate_learned", 2)
    gate_tolerance: float = like(AgentConfig, "gate_tolerance", 0.1)
    eval_every: int = like(AgentConfig, "eval_every", 16)
    eval_n: int = like(AgentConfig, "eval_n", 12)
    temperature: float = like(AgentConfig, "temperature", 0.7)
    max_new_tokens: int = like(AgentConfig, "max_new_tokens", 0)
    sample_batch: int = like(AgentConfig, "sample_batch", 32)
    max_covered: int = opt(4, "held-out streams of a note's cluster its admission scores (DistillConfig)", min=1)
    max_others: int = opt(4, "other stored streams a note's admission scores (DistillConfig)", min=0)
    stem_n: int = opt(
        32, "STEM test problems whose oracle solutions score each arm's final adapter (interference; 0: not measured)"
    )
    progress: bool = like(AgentConfig, "progress", True)

    def __post_init__(self) -> None:
        bad = [e for e in self.envs if e not in ENVS] + [a for a in self.arms if a not in ARMS]
        if bad or not self.envs or not self.arms:
            raise ValueError(f"envs are {', '.join(ENVS)}; arms are {', '.join(ARMS)}; not {bad}")
        if "consolidated" in self.arms and "both" not in self.arms:
            raise ValueError("the consolidated arm starts from the both arm's end: add both to --arms")


PRESETS: dict[str, MemoryExperimentConfig] = {
    # CI: the tiny random model, every arm, one update and one distillation each, the report; seconds.
    "smoke": MemoryExperimentConfig(
        model="tiny",
        envs=["discount"],
        seeds=2,
        episodes=4,
        update_every=2,
        epochs=1,
        batch_size=2,
        lora_r=2,
        lora_alpha=4,
        gate_control=1,
        gate_learned=1,
        eval_every=4,
        eval_n=2,
        max_new_tokens=4,
        stem_n=2,
        progress=False,
    ),
    # The embedded SmolLM2-135M, every arm, 3 seeds, the two rule environments (the seed's discount
    # cases, tau2-bench's airline policy); sized to run alone in <= 30 min on the 2-core machine
    # (docs/memory.md, "The experiment"): 16 episodes, an update / a distillation every 8 (two
    # optimiser steps of 4), 8 held-out items, admission scoring 2 + 2 streams per note, 8 STEM
    # problems. At 24 episodes / every 12 one seed of discount alone took 6.2 min. lr 1e-3 as
    # dual-lora's quick preset: two updates at the agent's 2e-4 move an adapter too little.
    "quick": MemoryExperimentConfig(
        envs=["discount", "airline"],
        episodes=16,
        update_every=8,
        replay=0.5,
        epochs=1,
        batch_size=4,
        lr=1e-3,
        gate_control=4,
        gate_learned=2,
        eval_every=8,
        eval_n=8,
        max_covered=2,
        max_others=2,
        stem_n=8,
        progress=False,
    ),
}


def resolve_preset(name: str, **overrides) -> MemoryExperimentConfig:
    """Preset `name` with some fields changed, e.g. `resolve_preset("smoke", seeds=1)`."""
    return dataclasses.replace(PRESETS[name], **overrides)


def arm_config(cfg: MemoryExperimentConfig, env: str, seed: int, arm: str) -> AgentConfig:
    """The loop's config of one arm: the experiment's values of the agent's fields, its learner and memory."""
    shared = {f.name for f in dataclasses.fields(AgentConfig)} & {f.name for f in dataclasses.fields(cfg)}
    learner = "interventional" if arm in ("weights", "both") else "none"
    return AgentConfig(
        **{k: getattr(cfg, k) for k in shared},
        env=env,
        seed=seed,
        learner=learner,
        group_size=1,
        memory=arm in ("memory", "both", "trusting"),
    )


def seed_dir(out: Path, env: str, seed: int) -> Path:
    return Path(out) / env / f"seed-{seed}"


def _loop(acfg: AgentConfig, d: Path, tok: Any, trusting: bool, distill_config) -> dict[str, Any]:
    log = lambda m: print(f"  {m}", flush=True)  # noqa: E731
    agent = ExperimentAgent(acfg, d, resume=True, tok=tok, log=log, distill_config=distill_config, trusting=trusting)
    try:
        s = agent.run()
        return {
            "successes": [ok for _, ok, _ in agent.store.successes()],
            "evals": agent.store.evals("heldout"),
            "updates": [{"after": u["after_episodes"], "accepted": u["accepted"]} for u in s["updates"]],
            "notes": len(agent.memory.notes()) if agent.memory is not None else 0,
            "seconds": s["seconds"],
        }
    finally:
        agent.store.close()
        if agent.memory is not None:
            agent.memory.close()


def _consolidated(acfg: AgentConfig, both: Path, tok: Any) -> dict[str, Any]:
    """`both`'s memory into `both`'s final adapter (one gated update), then held-out success with
    no memory, of the consolidated adapter and of `both`'s own adapter (what the weights alone kept)."""
    import time

    from dostream.agent.store import Store
    from dostream.memory.consolidate import MemorySource, consolidate
    from dostream.memory.store import Memory

    t0 = time.perf_counter()
    store = Store(both / "store.sqlite")
    final = store.current_adapter()
    store.close()
    memory = Memory.open_dir(both / "memory")
    try:
        source = MemorySource(
            memory, both / "consolidated", acfg.model, tok, start=None if final is None else both / final
        )
        done = consolidate(source, replace(acfg, learner="interventional"))
        in_force = source.lineage.versions.in_force()[0]
        adapter = source.lineage.path_of(in_force)
        notes = len(memory.notes())
    finally:
        memory.close()
    plain = Agent(replace(acfg, memory=False), both / "consolidated" / "eval", resume=True, tok=tok)
    try:
        ok = _heldout(plain, adapter)
        kept = _heldout(plain, None if final is None else both / final)
    finally:
        plain.store.close()
    return {
        "consolidation": None if done is None else {"accepted": done.accepted, "reason": done.reason},
        "notes": notes,
        "heldout_no_memory": {"successes": sum(ok), "n": len(ok)},
        "both_weights_no_memory": {"successes": sum(kept), "n": len(kept)},
        "seconds": time.perf_counter() - t0,
    }


def _heldout(agent: Agent, adapter: Path | None) -> list[bool]:
    """Greedy held-out success of the base model with `adapter` (an absolute path; None: the base)."""
    from dostream.models import load_model

    model = load_model(agent.cfg.model, adapter=adapter, merge=True)
    streams = agent.spec.act(
        model,
        agent.tok,
        agent.heldout,
        replace(agent.sampling, greedy=True),
        [f"heldout-{i:04d}" for i in range(len(agent.heldout))],
    )
    return [bool(s.meta["success"]) for s in streams]


def _interference(cfg: MemoryExperimentConfig, d: Path, tok: Any) -> dict[str, Any]:
    """Interference on the STEM test set: the mean log-likelihood per token of `stem_n` STEM test
    problems' oracle solutions (the question before each), under the base model and under each
    learning arm's final adapter. SmolLM2-135M solves none of them greedily (docs/stem_results.md),
    so success could not fall; the likelihood of the worked solutions can."""
    import time

    from dostream.agent.store import Store
    from dostream.envs.stem import generate
    from dostream.memory.admit import world_logprobs
    from dostream.models import load_model
    from dostream.render import Renderer
    from dostream.stream import Segment, Stream

    t0 = time.perf_counter()
    streams = [
        Stream(
            p.id,
            [
                Segment("protocol", "Question:\n"),
                Segment("context", p.question),
                Segment("protocol", "\n\nProposed solution:\n"),
                Segment("oracle", p.solution),
            ],
        )
        for p in generate("test", cfg.stem_n, seed=0)
    ]
    adapters: dict[str, Path | None] = {"base": None}
    for arm in ("weights", "both"):
        if (d / arm / "store.sqlite").exists():
            store = Store(d / arm / "store.sqlite")
            final = store.current_adapter()
            store.close()
            adapters[arm] = None if final is None else d / arm / final
    if (d / "both" / "memory" / "memory.sqlite").exists():  # the adapter in force after the consolidation
        from dostream.learning.versions import VERSIONS_SCHEMA, Versions
        from dostream.memory.store import Memory

        memory = Memory.open_dir(d / "both" / "memory")
        memory.db.executescript(VERSIONS_SCHEMA)
        in_force = Versions(memory.db).in_force()[0]
        memory.close()
        if in_force is not None:
            adapters["consolidated"] = d / "both" / "consolidated" / in_force
    renderer = Renderer(tok, add_eos=False)
    out: dict[str, Any] = {}
    for name, path in adapters.items():
        lp = world_logprobs(load_model(cfg.model, adapter=path, merge=True), renderer, streams)
        n = sum(len(x) for x in lp)
        out[name] = {
            "nats_per_token": sum(map(sum, lp)) / n,
            "tokens": n,
            "adapter": None if path is None else str(path.relative_to(d)),
        }
    return {"problems": cfg.stem_n, "scores": out, "seconds": time.perf_counter() - t0}


def run(cfg: MemoryExperimentConfig, out: str | Path, preset: str = "custom") -> Path:
    """Seeds 0..N-1, each environment, every arm. Cached stages under `out/stages/`; returns the run directory."""
    from dostream.models import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_dir(out, cfg, experiment=EXPERIMENT, may_change=MAY_CHANGE)
    write_run_record(out, cfg, {"preset": preset}, experiment=EXPERIMENT)
    from dostream.memory.distill import DistillConfig

    stages = Stages(out)
    tok = load_tokenizer(cfg.model)
    dcfg = DistillConfig(max_covered=cfg.max_covered, max_others=cfg.max_others)
    for seed in range(cfg.seeds):
        for env in cfg.envs:
            d = seed_dir(out, env, seed)
            for arm in cfg.arms:
                acfg = arm_config(cfg, env, seed, arm)
                if arm == "consolidated":
                    fn = lambda _, a=acfg, d=d: _consolidated(a, d / "both", tok)  # noqa: E731
                else:
                    fn = lambda _, a=acfg, d=d, arm=arm: _loop(a, d / arm, tok, arm == "trusting", dcfg)  # noqa: E731
                print(f"== {env} seed {seed}: {arm}", flush=True)
                stages.run(f"{env}-s{seed}-{arm}", fn)
            if cfg.stem_n > 0:
                stages.run(f"{env}-s{seed}-stem", lambda _, d=d: _interference(cfg, d, tok))
    return out
