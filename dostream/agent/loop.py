"""The continual agent: act, store what happened, learn from what the world wrote, act again.

One loop over an environment's seeded episode sequence:

1. act: the current adapter plays the next `update_every` episodes (batched sampling; every
   agent turn keeps its exact sampled token ids); the episodes go into the store in one
   transaction;
2. learn: the new episodes plus a replay sample of older ones are rendered under the view
   (`interventional`: the world's tokens are supervised, the agent's masked; `observational`:
   the agent's too) and the adapter is trained a little further (a fresh optimizer each time);
3. gate: the candidate and the adapter in force answer a control set (held-out items plus items
   the agent already solved, greedy); a candidate that loses more than `gate_tolerance` of
   success rate is rejected, the previous adapter stays in force, and the reason is logged;
4. every `eval_every` episodes: greedy success on a held-out split.

`view="none"` only acts and evaluates: the no-learning baseline on the same episode sequence.
Everything is recorded in `OUT/store.sqlite` (see `store.py`); adapters live in
`OUT/adapters/update-NNNNNN/`. A killed run continues with `resume=True`: episodes continue at the
stored count, an update that had not been recorded is redone (its training resumes from its own
checkpoint), nothing is lost or repeated.

>>> run(AgentConfig(env="support", model="tiny", episodes=32), "runs/agent")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dostream.agent.store import Store
from dostream.config import SupervisedBlock, atomic_write_text, block_values, check_run_dir, like, opt, write_run_record
from dostream.envs.registry import ENVS, env_spec
from dostream.render import Renderer, encode_rows
from dostream.sampling import SamplingConfig
from dostream.stream import view_authors

# The loops `agent run` compares: each learns from a view of `stream.VIEWS`, or not at all (`none`).
LOOPS = ("interventional", "observational", "none")


@dataclass
class AgentConfig(SupervisedBlock):
    """One loop of the agent. The LoRA/optimiser/batch fields of every update (lr, constant with a
    fresh AdamW per update; lora_r, lora_alpha, epochs, batch_size, max_length) are the shared
    `config.SupervisedBlock`."""

    env: str = opt(
        "support",
        "environment: support (calls to services), support-framed (the services' replies in "
        "the agent's own words), stem (problems + verifier), tutor (facts)",
        choices=ENVS,
    )
    model: str = opt("smollm2", "model NAME: smollm2 (embedded), tiny, a local dir or an HF id")
    view: str = opt(
        "interventional", "what updates learn from: interventional, observational, none (no learning)", choices=LOOPS
    )
    episodes: int = opt(192, "episodes to act in total")
    update_every: int = opt(16, "episodes between updates (also the acting batch)")
    replay: float = opt(1.0, "older episodes replayed per new episode in an update (drawn uniformly from the store)")
    epochs: int = like(SupervisedBlock, "epochs", 2)
    max_length: int = like(SupervisedBlock, "max_length", 512)
    gate_control: int = opt(16, "held-out control items the gate asks (0 with gate_learned 0: no gate)")
    gate_learned: int = opt(8, "items the agent already solved that the gate asks again")
    gate_tolerance: float = opt(0.1, "reject a candidate whose control success is this much below the adapter in force")
    eval_every: int = opt(48, "evaluate on the held-out split every N episodes (and at the start and the end)")
    eval_n: int = opt(48, "held-out items per evaluation")
    temperature: float = opt(
        0.7, "sampling temperature while acting (SmolLM2-135M at 1.0 writes mostly off-format turns)"
    )
    max_new_tokens: int = opt(0, "tokens per agent turn (0: the environment's default)")
    sample_batch: int = opt(32, "rows decoded together")
    seed: int = opt(0, "seed of the episode sequence, the world's rules, the samples and the updates")
    progress: bool = opt(True, "show a live progress line")


# -- the loop -------------------------------------------------------------------------------


class Agent:
    """One run directory: config, store, adapters. `run()` continues it to `cfg.episodes`."""

    def __init__(self, cfg: AgentConfig, out: str | Path, *, resume: bool = False, log: Callable[[str], None] = print):
        from dostream.models import load_tokenizer

        self.cfg, self.out, self.log = cfg, Path(out), log
        if cfg.update_every < 1 or cfg.episodes < 1:
            raise ValueError("episodes and update_every must be >= 1")
        self.out.mkdir(parents=True, exist_ok=True)
        # A stored run continues only with resume=True and its settings (--episodes may grow).
        check_run_dir(self.out, cfg, experiment="agent-arm", resume=resume, may_change=("episodes", "progress"))
        write_run_record(self.out, cfg, experiment="agent-arm")
        self.store = Store(self.out / "store.sqlite")
        self.spec = env_spec(cfg.env, cfg.seed)
        self.tok = load_tokenizer(cfg.model)
        self.items = self.spec.items("train", cfg.episodes, cfg.seed)
        self.heldout = self.spec.items("heldout", cfg.eval_n, cfg.seed)
        self.control = self.spec.items("control", cfg.gate_control, cfg.seed)
        self.sampling = SamplingConfig(
            temperature=cfg.temperature,
            batch_size=cfg.sample_batch,
            max_new_tokens=cfg.max_new_tokens or self.spec.max_new_tokens,
        )
        self._acting: tuple[str | None, Any] | None = None  # (adapter, merged model) cache

    # -- models ---------------------------------------------------------------------------
    def _path(self, rel: str | None) -> Path | None:
        return None if rel is None else self.out / rel

    def model_for(self, adapter: str | None):
        """The base model with `adapter` merged in (sampling runs faster without the LoRA split)."""
        if self._acting is not None and self._acting[0] == adapter:
            return self._acting[1]
        from dostream.models import load_model

        model = load_model(self.cfg.model, adapter=self._path(adapter), merge=True)
        self._acting = (adapter, model)
        return model

    def successes(self, adapter: str | None, items: list, tag: str) -> list[bool]:
        """Greedy success per item (evaluation and the gate)."""
        if not items:
            return []
        streams = self.spec.act(
            self.model_for(adapter),
            self.tok,
            items,
            replace(self.sampling, greedy=True),
            [f"{tag}-{i:04d}" for i in range(len(items))],
        )
        return [bool(s.meta["success"]) for s in streams]

    # -- steps ----------------------------------------------------------------------------
    def act(self, start: int, stop: int) -> None:
        adapter = self.store.current_adapter()
        sampling = replace(self.sampling, seed=self.cfg.seed * 1_000_003 + start)
        streams = self.spec.act(
            self.model_for(adapter),
            self.tok,
            self.items[start:stop],
            sampling,
            [f"ep-{seq:06d}" for seq in range(start, stop)],
        )
        for seq, s in zip(range(start, stop), streams):
            s.meta.update({"seq": seq, "adapter": adapter, "view": self.cfg.view})
        self.store.add_episodes([(seq, s, adapter) for seq, s in zip(range(start, stop), streams)])

    def evaluate(self, after: int) -> None:
        adapter = self.store.current_adapter()
        ok = self.successes(adapter, self.heldout, "heldout")
        self.store.add_eval("heldout", after, sum(ok), len(ok), adapter)
        self.log(f"[eval] after {after} episodes: held-out success {sum(ok)}/{len(ok)}")

    def learned_items(self, upto: int) -> list:
        """The most recent items the agent solved while acting (the gate asks them again)."""
        solved = [seq for seq, ok, _ in self.store.successes() if ok and seq < upto]
        return [self.items[seq] for seq in solved[-self.cfg.gate_learned :]] if self.cfg.gate_learned else []

    def update(self, after: int, previous: int) -> None:
        """Train the adapter in force on episodes [previous, after) plus replay; gate; record."""
        from dostream.models import load_model
        from dostream.train import TrainConfig, train

        cfg = self.cfg
        new = self.store.episodes(previous, after)
        old = self.store.episodes(0, previous)
        rng = random.Random(f"replay:{cfg.seed}:{after}")
        replayed = rng.sample(old, min(len(old), round(cfg.replay * len(new))))
        rows, stats = encode_rows(new + replayed, Renderer(self.tok), view_authors(cfg.view), max_length=cfg.max_length)
        current = self.store.current_adapter()
        cand = f"adapters/update-{after:06d}"
        metrics: dict[str, Any] = {
            "new": len(new),
            "replayed": len(replayed),
            "rows": len(rows),
            "supervised_tokens": stats.supervised_tokens,
            "tokens": stats.tokens,
        }
        if not rows:
            self.store.add_update(after, cand, False, "no supervised token in the update's streams", metrics)
            return
        base = load_model(cfg.model, adapter=self._path(current), trainable=True)
        tcfg = TrainConfig(
            model=cfg.model,
            view=cfg.view,
            **block_values(cfg, SupervisedBlock),
            warmup_ratio=0.0,
            schedule="constant",
            seed=cfg.seed * 1_000_003 + after,
            save_every=0,
            keep_checkpoints=1,
            progress=False,
        )
        result = train(
            rows,
            tcfg,
            self.out / cand,
            model=base,
            pad_id=self.tok.pad_token_id,
            resume=True,
            extra_record={"method": f"agent_{cfg.view}", "after_episodes": after},
        )
        metrics["train/loss"] = sum(m["train/loss"] for m in result.metrics) / max(1, len(result.metrics))
        metrics["train/steps"] = result.steps
        adapter = f"{cand}/adapter"
        accepted, reason = True, "no gate"
        control = self.control + self.learned_items(after)
        if control:
            before = self.successes(current, control, "control")
            after_ok = self.successes(adapter, control, "control")
            b, a = sum(before) / len(control), sum(after_ok) / len(control)
            metrics.update({"gate/before": b, "gate/after": a, "gate/n": len(control)})
            accepted = a >= b - cfg.gate_tolerance
            reason = f"control success {a:.2f} vs {b:.2f} in force (tolerance {cfg.gate_tolerance})" + (
                "" if accepted else ": regression, previous adapter restored"
            )
        self.store.add_update(after, adapter, accepted, reason, metrics)
        self.log(f"[update] after {after} episodes: {'accepted' if accepted else 'REJECTED'}: {reason}")

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        n = self.store.n_episodes()
        bar = tqdm(
            total=cfg.episodes,
            initial=n,
            desc=f"agent {cfg.env}/{cfg.view}",
            unit="ep",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        while True:
            if (
                n > 0
                and n % cfg.update_every == 0
                and cfg.view != "none"
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


def run(cfg: AgentConfig, out: str | Path, *, resume: bool = False) -> dict[str, Any]:
    agent = Agent(cfg, out, resume=resume)
    try:
        return agent.run()
    finally:
        agent.store.close()
