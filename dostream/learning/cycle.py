"""One turn of the learning cycle: read the source, learn a candidate, gate it, record it, swap it in. Knows no environment and no HTTP.

    source ──► Batch (new streams, replay, how far it was read)
                 │
                 ▼
    learner (`learners.learn`: a view through `train()`, DAPO, dual) ──► candidate adapter
                 │
                 ▼
    Gate: the candidate and the adapter in force answer the source's checks ──► keep or restore
                 │
                 ▼
    Versions: the update and the adapter in force after it, one transaction ──► swap

The continual agent (`agent/loop.py`: episodes from an environment, checks = held-out items and
items it solved) and the server (`serve/learn.py`: conversations since the last update, checks =
a control set and replies that earned a reward) run this one function. A new learner (memory,
one per tenant) is a new source or learner here, not a new cycle.

An update is a pure function of its batch, the adapter in force and its seed. Its candidate lands
atomically in `ROOT/adapters/update-NNNNNN/adapter/`; a kill before its record leaves the previous
adapter in force and the update to be redone (continuing the leftover directory where the source
allows it: the agent's updates resume exactly).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dostream.config import block_values
from dostream.files import atomic_write_text
from dostream.learning.config import Update, UpdateConfig
from dostream.learning.gate import Gate
from dostream.learning.versions import Versions
from dostream.stream import Stream

ADAPTERS = "adapters"  # beside the store: ROOT/adapters/update-NNNNNN/adapter/


@dataclass
class Batch:
    """What one update learns from, as the source read it."""

    step: int  # names the update's directory (update-NNNNNN) and seeds it
    seen: dict[str, int]  # how far the source was read: `versions.seen`
    new: list[Stream]
    replayed: list[Stream]
    group_size: int = 1  # K of the reward learners' groups in `new`
    metrics: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """What a learner reads and how its candidates are checked."""

    turn_budget: int  # tokens per sampled turn (the reward learners' overlong penalty)
    # True: a leftover directory of this update is discarded; False: continued (exact resume) when
    # it was made for the same batch (its `batch.json` holds the batch's `seen`), else discarded
    fresh: bool

    def checks(self, seen: dict[str, int]) -> tuple[list[Any], list[str], int]:
        """(the gate's checks, their ids, how many of them are the fixed control set)."""
        ...

    def ask(self, adapter: str | None, checks: list[Any]) -> list[bool]:
        """Greedy pass or fail of `adapter` (None: version 0) on each check."""
        ...


@dataclass
class Lineage:
    """One line of adapter versions: its store's versions table and where its adapters live."""

    root: Path  # the store's directory; recorded adapters are relative to it
    versions: Versions
    start: Path | None = None  # version 0: the adapter the lineage started from (None: the base model)

    def path_of(self, adapter: str | None) -> Path | None:
        """A recorded adapter's directory; None: version 0's."""
        return self.start if adapter is None else self.root / adapter

    def dir_of(self, step: int) -> Path:
        return self.root / ADAPTERS / f"update-{step:06d}"


def replay_sample(old: list, n_new: int, replay: float, key: str) -> list:
    """`replay` older items per new one, drawn uniformly without replacement, seeded by `key`."""
    return random.Random(key).sample(old, min(len(old), round(replay * n_new)))


@dataclass
class Recorded:
    version: int
    accepted: bool
    reason: str
    candidate: str | None


def update_once(
    cfg: UpdateConfig,
    model: str,
    tok: Any,
    source: Source,
    batch: Batch,
    lineage: Lineage,
    *,
    lock: Any = None,
    swap: Any = None,
) -> Recorded:
    """Learn a candidate from `batch` starting at the adapter in force, gate it on the source's
    checks, record it (and the adapter in force after it) in one transaction, then `swap(candidate)`
    if it was accepted. `lock` (held while recording and swapping) keeps a concurrent rollback from
    interleaving: a candidate trained on an adapter that is no longer in force is rejected."""
    from dostream.learning.learners import learn

    t0 = time.time()
    current = lineage.versions.in_force()
    out = lineage.dir_of(batch.step)
    made_for = out / "batch.json"
    if source.fresh or (made_for.exists() and json.loads(made_for.read_text()) != batch.seen):
        shutil.rmtree(out, ignore_errors=True)  # a leftover of an attempt that failed, or of other data
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(made_for, json.dumps(batch.seen, sort_keys=True))
    update = Update(**block_values(cfg, UpdateConfig), model=model, group_size=max(1, batch.group_size))
    learned = learn(
        update, tok, batch.step, batch.new, batch.replayed, lineage.path_of(current[0]), out, source.turn_budget
    )
    metrics = {**batch.metrics, **learned.metrics}
    gate: dict[str, Any] = {}
    if learned.adapter is None:
        accepted, reason, candidate = False, f"nothing learned: {learned.reason}", None
    else:
        candidate = str(Path(learned.adapter).relative_to(lineage.root))
        checks, ids, control = source.checks(batch.seen)
        accepted, reason, gate = Gate(cfg.gate_tolerance).judge(
            checks, source.ask, current[0], candidate, ids=ids, control=control
        )
        if gate:
            metrics.update({"gate/before": gate["before"], "gate/after": gate["after"], "gate/n": gate["n"]})
    metrics["time/started"], metrics["time/finished"] = t0, time.time()
    with lock if lock is not None else contextlib.nullcontext():
        if lineage.versions.in_force() != current:
            accepted, reason = False, "the adapter in force changed during the update (a rollback)"
        version = lineage.versions.add("update", candidate, accepted, reason, gate, metrics, batch.seen)
        if accepted and swap is not None:
            swap(candidate)
    for done in out.glob("**/checkpoints"):  # recorded: no redo will need them
        shutil.rmtree(done, ignore_errors=True)
    return Recorded(version, accepted, reason, candidate)
