"""The continual agent: act, store what happened, learn from what the world wrote, act again.

One loop over an environment's seeded episode sequence:

1. act: the current adapter plays the next `update_every` episodes (batched sampling; every
   agent turn keeps its exact sampled token ids); the episodes go into the store in one
   transaction. With `group_size` K > 1 each item of the sequence is played K times in a row
   (a group: what the reward learners compare), the same for every learner of a run;
2. learn: the learner (`learning/learners.py`, through the one learning cycle `learning/cycle.py`) trains a candidate from the new episodes (plus a
   replay sample of older ones for the NLL losses): `interventional` (the world's tokens
   supervised, the agent's masked), `observational` (the agent's too), `dapo` (reward only),
   `dual` (DAPO and the world NLL, each on its own half of one adapter) or `dual-shared`; a fresh
   optimizer each time;
3. gate: the candidate and the adapter in force answer a control set (held-out items plus items
   the agent already solved, greedy); a candidate that loses more than `gate_tolerance` of
   success rate is rejected, the previous adapter stays in force, and the reason is logged;
4. every `eval_every` episodes: greedy success on a held-out split.

`learner="none"` only acts and evaluates: the no-learning baseline on the same episode sequence.
Everything is recorded in `OUT/store.sqlite` (see `store.py`); adapters live in
`OUT/adapters/update-NNNNNN/adapter/` (a PEFT adapter each). A killed run continues with
`resume=True`: episodes continue at the stored count, an update that had not been recorded is
redone, nothing is lost or repeated. Once an update is recorded its training checkpoints are
removed (only an update killed before its record needs them).

>>> run(AgentConfig(env="support", model="tiny", episodes=32), "runs/agent")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dostream.agent.store import Store
from dostream.config import check_run_dir, opt, write_run_record
from dostream.envs.registry import ENVS, env_spec
from dostream.files import atomic_write_text
from dostream.learning.config import (
    DEFAULT_GROUP,
    DEFAULT_LEARNERS,
    LEARNERS,
    REWARD_LEARNERS,
    UpdateConfig,
    check_learner,
    group_size_for,
)
from dostream.learning.cycle import Batch, Lineage, replay_sample, update_once
from dostream.sampling import SamplingConfig

# What a stored run may change on --resume: how far it goes and how visibly.
MAY_CHANGE = ("episodes", "progress")


@dataclass
class AgentConfig(UpdateConfig):
    """One loop of the agent. What an update learns and how it is gated (learner, LoRA and
    optimiser, replay, gate tolerance, DAPO) is the shared `learning.config.UpdateConfig`."""

    env: str = opt(
        "support",
        "environment: support (calls to services), support-framed (the services' replies in "
        "the agent's own words), stem (problems + verifier), tutor (facts)",
        choices=ENVS,
    )
    model: str = opt("smollm2", "model NAME: smollm2 (embedded), tiny, a local dir or an HF id")
    episodes: int = opt(192, "episodes to act in total")
    update_every: int = opt(16, "episodes between updates (also the acting batch)")
    group_size: int = opt(
        0,
        f"K: each item is played K times in a row (a group, what DAPO compares); 0: {DEFAULT_GROUP} where a "
        f"learner of the run learns from reward ({', '.join(REWARD_LEARNERS)}), else 1",
        min=0,
    )
    gate_control: int = opt(16, "held-out control items the gate asks (0 with gate_learned 0: no gate)")
    eval_every: int = opt(48, "evaluate on the held-out split every N episodes (and at the start and the end)")
    eval_n: int = opt(48, "held-out items per evaluation")
    temperature: float = opt(
        0.7, "sampling temperature while acting (SmolLM2-135M at 1.0 writes mostly off-format turns)"
    )
    max_new_tokens: int = opt(0, "tokens per agent turn (0: the environment's default)")
    sample_batch: int = opt(32, "rows decoded together")
    seed: int = opt(0, "seed of the episode sequence, the world's rules, the samples and the updates")
    memory: bool = opt(
        False, "a memory in OUT/memory: notes retrieved into each episode's opening, distilled after each acting block"
    )
    memory_k: int = opt(4, "notes retrieved into an episode (--memory)", min=1)
    progress: bool = opt(True, "show a live progress line")


# -- the loop -------------------------------------------------------------------------------


class Agent:
    """One run directory: config, store, adapters. `run()` continues it to `cfg.episodes`."""

    def __init__(
        self,
        cfg: AgentConfig,
        out: str | Path,
        *,
        resume: bool = False,
        log: Callable[[str], None] = print,
        tok: Any = None,
        base_memo: dict | None = None,
    ):
        from dostream.models import load_tokenizer

        if cfg.group_size == 0:
            cfg = replace(cfg, group_size=group_size_for([cfg.learner]))
        self.cfg, self.out, self.log = cfg, Path(out), log
        if cfg.update_every < 1 or cfg.episodes < 1:
            raise ValueError("episodes and update_every must be >= 1")
        check_learner(cfg.learner, cfg.group_size, cfg.update_every)
        self.out.mkdir(parents=True, exist_ok=True)
        # A stored run continues only with resume=True and its settings (--episodes may grow).
        check_run_dir(self.out, cfg, experiment="agent-arm", resume=resume, may_change=MAY_CHANGE)
        write_run_record(self.out, cfg, experiment="agent-arm")
        self.store = Store(self.out / "store.sqlite")
        self.lineage = Lineage(self.out, self.store.versions)
        self.spec = env_spec(cfg.env, cfg.seed)
        self.memory = None
        # what reads a learned procedure from an episode (`memory.tools`): the support worlds only
        self.tools = None
        if cfg.memory and cfg.env in ("support", "support-framed"):
            from dostream.envs.support import procedure_of

            self.tools = procedure_of
        if cfg.memory:  # episodes open with the memory's notes (`agent/memory.py`)
            from dostream.agent.memory import Remembering
            from dostream.memory.store import Memory

            self.memory = Memory.open_dir(self.out / "memory")
            self.bare = self.spec  # the environment itself (a tool is verified in it)
            remembering = lambda: Remembering(self.bare.make_env(), self.memory, cfg.memory_k)  # noqa: E731
            if self.tools:  # and offered the verified tools it learned (`memory.tools`)
                from dostream.memory.tools import Tooled

                name = f"{cfg.env}:{cfg.seed}"
                self.spec = replace(self.spec, make_env=lambda: Tooled(remembering(), self.memory, name))
            else:
                self.spec = replace(self.spec, make_env=remembering)
        self.tok = tok if tok is not None else load_tokenizer(cfg.model)  # several loops may share one
        # Episode seq plays item seq // K; the first items of a split do not depend on how many are drawn.
        self.items = self.spec.items("train", -(-cfg.episodes // cfg.group_size), cfg.seed)
        self.heldout = self.spec.items("heldout", cfg.eval_n, cfg.seed)
        self.control = self.spec.items("control", cfg.gate_control, cfg.seed)
        self.sampling = SamplingConfig(
            temperature=cfg.temperature,
            batch_size=cfg.sample_batch,
            max_new_tokens=cfg.max_new_tokens or self.spec.max_new_tokens,
        )
        # The merged models last used, by adapter: the adapter in force and the gate's candidate
        # (the gate asks both, then the winner acts), so an update loads one model, not three.
        self._acting: dict[str | None, Any] = {}
        # The base model's greedy successes by (tag, items): the same for every loop of one
        # `run_learners` (held-out at the start, the no-learning loop's evaluations, the first gate).
        self.base_memo = base_memo

    # -- models ---------------------------------------------------------------------------
    def model_for(self, adapter: str | None):
        """The base model with `adapter` merged in (sampling runs faster without the LoRA split)."""
        if adapter in self._acting:
            self._acting[adapter] = self._acting.pop(adapter)  # most recently used last
            return self._acting[adapter]
        from dostream.models import load_model

        model = load_model(self.cfg.model, adapter=None if adapter is None else self.out / adapter, merge=True)
        self._acting[adapter] = model
        while len(self._acting) > 2:
            self._acting.pop(next(iter(self._acting)))
        return model

    def successes(self, adapter: str | None, items: list, tag: str) -> list[bool]:
        """Greedy success per item (evaluation and the gate)."""
        if not items:
            return []
        key = (tag, tuple(map(repr, items)))
        memo = self.base_memo if self.memory is None else None  # (with a memory, not the base model's alone)
        if adapter is None and memo is not None and key in memo:
            return list(memo[key])
        streams = self.spec.act(
            self.model_for(adapter),
            self.tok,
            items,
            replace(self.sampling, greedy=True),
            [f"{tag}-{i:04d}" for i in range(len(items))],
        )
        ok = [bool(s.meta["success"]) for s in streams]
        if adapter is None and memo is not None:
            memo[key] = ok
        return ok

    # -- steps ----------------------------------------------------------------------------
    def item(self, seq: int):
        """The item episode `seq` plays: each item K times in a row."""
        return self.items[seq // self.cfg.group_size]

    def act(self, start: int, stop: int) -> None:
        adapter = self.store.current_adapter()
        sampling = replace(self.sampling, seed=self.cfg.seed * 1_000_003 + start)
        streams = self.spec.act(
            self.model_for(adapter),
            self.tok,
            [self.item(seq) for seq in range(start, stop)],
            sampling,
            [f"ep-{seq:06d}" for seq in range(start, stop)],
        )
        if self.memory is not None:
            from dostream.agent.memory import count_used

            count_used(self.memory, streams)
            if self.tools:
                from dostream.memory.tools import count_calls

                count_calls(self.memory, streams)
        for seq, s in zip(range(start, stop), streams):
            meta = {"seq": seq, "adapter": adapter, "learner": self.cfg.learner}
            s.meta.update(meta if self.cfg.group_size == 1 else {**meta, "group": seq // self.cfg.group_size})
        self.store.add_episodes([(seq, s, adapter) for seq, s in zip(range(start, stop), streams)])

    distill_config = None  # a `memory.distill.DistillConfig` (None: its defaults)

    def distill(self, upto: int) -> None:
        """The episodes acted since the last distillation, into the memory (`agent/memory.py`)."""
        from dostream.agent.memory import distill_since

        model = self.model_for(self.store.current_adapter())
        done = distill_since(
            self.memory, self.out / "memory", self.store.episodes, upto, model, self.tok, self.distill_config
        )
        if done is not None:
            self.log(f"[memory] after {upto} episodes: {done['admitted']} of {done['candidates']} candidates admitted")
        if done is not None and self.tools:
            from dostream.agent.memory import learn_tools

            # verified on calls of a draw of its own (not the episodes' sequence, not the held-out split)
            items = self.bare.items("train", 64, self.cfg.seed + 7919)
            t = learn_tools(
                self.memory,
                f"{self.cfg.env}:{self.cfg.seed}",
                done["streams"],
                self.tools,
                self.bare.make_env,
                items,
            )
            self.log(f"[memory] tools: {t['tools']} shown, {t['verified']} verified, {t['refused']} refused")

    def evaluate(self, after: int) -> None:
        adapter = self.store.current_adapter()
        ok = self.successes(adapter, self.heldout, "heldout")
        self.store.add_eval("heldout", after, sum(ok), len(ok), adapter)
        self.log(f"[eval] after {after} episodes: held-out success {sum(ok)}/{len(ok)}")

    def learned_items(self, upto: int) -> list:
        """The most recent items the agent solved while acting (the gate asks them again)."""
        k = self.cfg.group_size
        solved = [seq // k for seq, ok, _ in self.store.successes() if ok and seq < upto]
        recent = list(dict.fromkeys(reversed(solved)))[: self.cfg.gate_learned]  # each item once
        return [self.items[i] for i in reversed(recent)]

    # -- the learning cycle's source (learning/cycle.py) ----------------------------------
    fresh = False  # an update killed mid-way continues its directory: the redo ends with the same weights

    @property
    def turn_budget(self) -> int:
        return self.sampling.max_new_tokens

    def checks(self, seen: dict[str, int]) -> tuple[list, list[str], int]:
        """The control items, then the items the agent already solved before the update."""
        learned = self.learned_items(seen["episodes"])
        ids = [f"control-{i}" for i in range(len(self.control))] + [f"learned-{i}" for i in range(len(learned))]
        return self.control + learned, ids, len(self.control)

    def ask(self, adapter: str | None, items: list) -> list[bool]:
        return self.successes(adapter, items, "control")

    def update(self, after: int, previous: int) -> None:
        """The learner trains a candidate on episodes [previous, after) (plus replay); gate; record."""
        cfg = self.cfg
        new = self.store.episodes(previous, after)
        replayed = replay_sample(self.store.episodes(0, previous), len(new), cfg.replay, f"replay:{cfg.seed}:{after}")
        batch = Batch(after, {"episodes": after}, new, replayed, cfg.group_size)
        outcome = update_once(cfg, cfg.model, self.tok, self, batch, self.lineage)
        self.log(f"[update] after {after} episodes: {'accepted' if outcome.accepted else 'REJECTED'}: {outcome.reason}")

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        n = self.store.n_episodes()
        bar = tqdm(
            total=cfg.episodes,
            initial=n,
            desc=f"agent {cfg.env}/{cfg.learner}",
            unit="ep",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        while True:
            if (
                n > 0
                and n % cfg.update_every == 0
                and cfg.learner != "none"
                and n < cfg.episodes
                and not self.store.has_update(n)
            ):
                self.update(n, n - cfg.update_every)
            if (n % cfg.eval_every == 0 or n >= cfg.episodes) and not self.store.has_eval("heldout", n):
                self.evaluate(n)
            if n >= cfg.episodes:
                break
            stop = min(n + cfg.update_every - n % cfg.update_every, cfg.episodes)
            self.act(n, stop)
            bar.update(stop - n)
            n = stop
            if self.memory is not None:
                self.distill(n)
            bar.set_postfix_str(self.progress_line(), refresh=True)
        bar.close()
        timing = self.out / "timing.json"
        seconds = (json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0) + time.perf_counter() - t0
        atomic_write_text(timing, json.dumps({"seconds": seconds}) + "\n")
        return {**self.summary(), "seconds": seconds}

    def progress_line(self, window: int = 32) -> str:
        recent = [ok for _, ok, _ in self.store.successes()[-window:]]
        ups = self.store.updates()
        acc = sum(u["accepted"] for u in ups)
        ev = self.store.evals("heldout")
        held = f" held-out {ev[-1]['successes']}/{ev[-1]['n']}" if ev else ""
        return (
            f"success(last {len(recent)}) {sum(recent) / max(1, len(recent)):.2f} "
            f"updates {acc} accepted / {len(ups) - acc} rejected{held}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "episodes": self.store.n_episodes(),
            "successes": sum(ok for _, ok, _ in self.store.successes()),
            "updates": self.store.updates(),
            "evals": self.store.evals(),
        }


def run(
    cfg: AgentConfig, out: str | Path, *, resume: bool = False, tok: Any = None, base_memo: dict | None = None
) -> dict[str, Any]:
    agent = Agent(cfg, out, resume=resume, tok=tok, base_memo=base_memo)
    try:
        return agent.run()
    finally:
        agent.store.close()
        if agent.memory is not None:
            agent.memory.close()


def run_learners(
    cfg: AgentConfig,
    learners: list[str] | tuple[str, ...] = DEFAULT_LEARNERS,
    out: str | Path = "runs/agent",
    *,
    resume: bool = False,
    record: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """One run directory, one loop per learner (`OUT/<learner>/`), in order, on the same seeded
    episode sequence with the same K (`group_size_for`). `OUT/config.json` (experiment `agent`)
    names the learners; `agent.report.write_report(OUT)` compares them. Returns each loop's summary."""
    learners = list(learners)
    bad = [x for x in learners if x not in LEARNERS]
    if bad or not learners or len(set(learners)) != len(learners):
        raise ValueError(f"learners {learners}: each one of {', '.join(LEARNERS)}, once")
    base = replace(cfg, learner=learners[0], group_size=group_size_for(learners, cfg.group_size))
    for learner in learners:
        check_learner(learner, base.group_size, base.update_every)
    out = Path(out)
    check_run_dir(out, base, experiment="agent", resume=resume, may_change=MAY_CHANGE)
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, base, {"learners": learners, **(record or {})}, experiment="agent")
    from dostream.models import load_tokenizer

    tok = load_tokenizer(base.model)
    summaries, base_memo = {}, {}
    for learner in learners:
        log(f"== {learner} ({out / learner})")
        s = summaries[learner] = run(
            replace(base, learner=learner), out / learner, resume=resume, tok=tok, base_memo=base_memo
        )
        log(
            f"== {learner}: {s['successes']}/{s['episodes']} episodes succeeded, "
            f"{sum(u['accepted'] for u in s['updates'])}/{len(s['updates'])} updates accepted, {s['seconds']:.0f} s"
        )
    return summaries
