"""The served agent learns while it serves: the server's source for the one learning cycle, its thread, rollback.

`dostream serve --learn` runs a `Learner` beside the batcher, on its own thread with its own torch
thread budget (`--learn-threads`; OpenMP's thread count is per thread, so serving keeps its own).
Each update is one turn of `learning.cycle.update_once`, the same function the continual agent
runs; what is the server's own is the source:

1. trigger: every `--update-every-tokens` supervised tokens (under the learner's view) in the
   conversations that are new since the last update, or `POST /v1/learn` (admin scope);
2. batch: the new conversations plus replayed older ones (`--replay` per new one). The learners
   render plain; a served conversation is rendered with the chat template, so each is handed over
   as `as_plain(stream)`, whose plain rendering is its chat rendering (the ids the server
   conditioned on). The reward learners (dapo, dual) learn from groups: a request with n >= 2
   choices, each given a reward;
3. checks: the control set (`--control FILE`, `serve/checks.py`) and the latest conversations the
   agent already answered well (a positive reward in feedback: the check is that the reply's first
   line comes back), asked greedily of the candidate and the adapter in force (`learning.gate`);
4. swap: an accepted candidate is recorded as the adapter in force in the same transaction as its
   update (`learning.versions`) and then swapped in through `ModelSlot`: the batcher reads the slot
   once per batch, so requests in flight finish on the old model and new ones get the new one, and
   no request fails because of a swap.

Adapters live in `STORE/adapters/update-NNNNNN/` (the update's training run; `adapter/`, a PEFT
adapter). A kill at any point: the restarted server serves the adapter the store says is in force;
an update without a record is discarded (its directory removed) and, since the conversations it
had not recorded as seen are still new, redone by the next trigger. `POST /v1/adapters/rollback`
(admin) puts an earlier accepted version back in force (version 0: the adapter the server started
with); `GET /v1/adapters` lists the versions with their gate results and which is in force.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dostream.config import like, opt
from dostream.learning.config import REWARD_LEARNERS, UPDATE_LEARNERS, UpdateConfig, learner_help
from dostream.learning.cycle import Batch, Lineage, replay_sample, update_once
from dostream.openmp import release_pool
from dostream.render import Renderer, encode_rows
from dostream.serve.checks import Check, read_control
from dostream.stream import Segment, Stream, view_authors

POLL_S = 0.5  # how often the learner looks for new conversations


@dataclass
class LearnConfig(UpdateConfig):
    """What `dostream serve --learn` learns, when, and the gate (what an update learns and how it
    is gated is the shared `learning.config.UpdateConfig`, DAPO's knobs included)."""

    learner: str = opt("interventional", learner_help(UPDATE_LEARNERS), choices=UPDATE_LEARNERS)
    update_every_tokens: int = opt(
        2048, "update after this many new supervised tokens (under the learner's view) in new conversations", min=1
    )
    learn_threads: int = opt(1, "torch threads of the learner (serving keeps its own)", min=1)
    control: str = opt("", "the gate's control set: JSONL conversations with a check (docs/design.md); '' none")
    gate_tolerance: float = like(UpdateConfig, "gate_tolerance", 0.0)
    gate_learned: int = opt(8, "conversations the agent already answered well (reward > 0) the gate asks again", min=0)
    gate_max_tokens: int = opt(32, "tokens per gate answer (a control line's max_tokens overrides it)", min=1)


# -- served conversations as the learners' streams --------------------------------------------


def as_plain(stream: Stream, renderer: Renderer) -> Stream:
    """`stream` as segments whose plain rendering is its chat rendering by `renderer` (plus the
    closing EOS): one segment per piece the template renderer tokenised, the template's text with
    the authors it gave it, sampled pieces with their exact ids. The learners render plain; the
    server conditions on the chat rendering; this makes the two the same ids."""
    r = renderer.render(stream)
    sampled = iter([s for s in stream.segments if s.author == "agent" and s.token_ids is not None])
    nxt = next(sampled, None)
    out = []
    for piece in r.segments:
        text = r.text[piece["start"] : piece["end"]]
        if piece["author"] == "agent" and nxt is not None and text == nxt.text:
            out.append(Segment("agent", text, token_ids=list(nxt.token_ids)))
            nxt = next(sampled, None)
        else:
            out.append(Segment(piece["author"], text))
    return Stream(stream.id, out, dict(stream.meta))


def reward_groups(streams: list[Stream]) -> tuple[list[Stream], list[Stream], int]:
    """(the streams of complete reward groups, consecutive, `meta.group` set; the rest; K). A group
    is the n >= 2 choices of one request (the leaves that end at the same completion), each with a
    reward; K is the most common group size (groups of another size go with the rest)."""
    by_leaf: dict[str, list[Stream]] = {}
    for s in streams:
        by_leaf.setdefault(s.meta["completions"][-1], []).append(s)
    sizes = [len(g) for g in by_leaf.values() if len(g) >= 2 and all("reward" in s.meta for s in g)]
    k = max(set(sizes), key=sizes.count) if sizes else 0
    grouped, rest = [], []
    for leaf, g in by_leaf.items():
        if k and len(g) == k and all("reward" in s.meta for s in g):
            grouped += [Stream(s.id, s.segments, {**s.meta, "group": leaf}) for s in g]
        else:
            rest += g
    return grouped, rest, k


# -- the learner -------------------------------------------------------------------------------


class Learner:
    """The adapter versions of one server: updates (with `cfg`, on a thread), the gate's checks,
    the swap, rollback, the listing. Without `cfg` (a server not started with --learn) it only
    lists and rolls back.

    It is given only what it uses: the store (conversations, rewards) and its lineage (versions,
    adapter directories), the tokenizer, the slot it swaps, and `load(path)`, which loads the base
    model with an adapter merged in the precision the server resolved."""

    fresh = True  # a leftover directory of an update is a failed attempt on other data: discarded

    def __init__(
        self,
        cfg: LearnConfig | None,
        *,
        model: str,
        store: Any,
        lineage: Lineage,
        tok: Any,
        slot: Any,
        load: Callable[[Path | None], Any],
        fast_step: bool = True,
    ):
        self.cfg, self.model_name, self.store, self.lineage = cfg, model, store, lineage
        self.tok, self.slot, self.load, self.fast_step = tok, slot, load, fast_step
        self.renderer = Renderer(tok, chat_template=True)
        self.control = read_control(cfg.control) if cfg is not None and cfg.control else []
        for c in self.control:  # every control prompt renders (the gate would fail later otherwise)
            try:
                self.renderer.prompt_ids(Stream(c.id, c.segments))
            except ValueError as e:
                raise ValueError(f"{c.source}: field 'messages': {e}") from None
        self._lock = threading.Lock()  # one change of the adapter in force at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._waiters: list[Future] = []
        self._counted: tuple[tuple[int, int], int] | None = None  # (latest seqs, supervised tokens)
        self._models: dict[str | None, Any] = {}  # merged models by adapter: the one in force, the candidate
        self.running: dict[str, Any] | None = None  # the update in progress
        self.log = print
        self.on_swap: Callable[[], None] | None = None  # called after each swap (update or rollback)
        self._thread = threading.Thread(target=self._loop, name="dostream-learner", daemon=True)
        if cfg is not None:
            self._discard_unrecorded()

    @property
    def versions(self):
        return self.lineage.versions

    @property
    def turn_budget(self) -> int:
        return self.cfg.gate_max_tokens

    # -- models -----------------------------------------------------------------------------
    def _discard_unrecorded(self) -> None:
        """An update killed before its record: its directory goes (the update is redone)."""
        recorded = {(self.lineage.root / u["candidate"]).parent for u in self.versions.rows() if u["candidate"]}
        folder = self.lineage.dir_of(0).parent  # ROOT/adapters, or a tenant's (`serve/tenants.py`)
        for d in sorted(folder.glob("update-*")) if folder.exists() else []:
            if d not in recorded:
                shutil.rmtree(d, ignore_errors=True)

    def _model(self, adapter: str | None):
        """The base model with `adapter` merged, in the server's precision (cached: in force + candidate)."""
        if adapter not in self._models:
            self._models[adapter] = self.load(self.lineage.path_of(adapter))
        return self._models[adapter]

    def _swap(self, adapter: str | None) -> None:
        import torch

        from dostream.cached_forward import CachedForward

        model = self._model(adapter)
        with torch.inference_mode():
            forward = CachedForward.build(model) if self.fast_step else None
        name = adapter if adapter is not None else self.lineage.start
        self.slot.swap(model, None if name is None else str(name), forward=forward)
        self._models = {adapter: model}
        if self.on_swap is not None:  # the tenant's snapshot (`serve/tenants.py`)
            self.on_swap()

    # -- the thread -------------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)  # an update in progress is not interrupted: it is redone after a restart

    def trigger(self) -> Future:
        """Ask for an update now; the future resolves to its record (or why there was none)."""
        if self.cfg is None:
            raise RuntimeError("this server does not learn (start it with --learn)")
        f: Future = Future()
        with self._lock:
            self._waiters.append(f)
        self._wake.set()
        return f

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.cfg.learn_threads)  # per thread (OpenMP): serving keeps its own
        while not self._stop.is_set():
            self._wake.wait(timeout=POLL_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._lock:
                waiters, self._waiters = self._waiters, []
            try:
                result = self.step(force=bool(waiters))
            except Exception as e:  # an update that fails is logged; serving goes on
                result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
                self.log(f"dostream serve: update failed: {result['error']}")
            release_pool()  # its OpenMP workers idle until the next update: not beside the sampling thread's
            for w in waiters:
                w.set_result(result)
        for w in self._waiters:
            w.set_result({"status": "stopped"})

    def learned_upto(self) -> tuple[int, int]:
        """(exchange seq, feedback seq) every update so far has seen (-1, -1 before any)."""
        return self.versions.seen_max("exchanges"), self.versions.seen_max("feedback")

    def step(self, force: bool = False) -> dict[str, Any] | None:
        """One look: update if forced or enough is new; returns the update's record, or why not."""
        upto = self.learned_upto()
        latest = self.store.latest_seqs()
        if latest[0] <= upto[0] and latest[1] <= upto[1]:
            return {"status": "nothing to learn", "detail": "no conversation is new since the last update"}
        if not force:
            if self._counted is not None and self._counted[0] == latest:
                return None
            new_ids, _ = self.store.conversations_since(upto)
            tokens = self.supervised_tokens(self.streams(new_ids))
            self._counted = (latest, tokens)
            if tokens < self.cfg.update_every_tokens:
                return None
        return self.update(upto, latest)

    # -- the source: data -------------------------------------------------------------------
    def streams(self, conversations: list[str], until: tuple[int, int] | None = None) -> list[Stream]:
        """The conversations as the learners' streams, as they stood at `until` (None: now)."""
        return [as_plain(s, self.renderer) for c in conversations for s in self.store.conversation_streams(c, until)]

    def supervised_tokens(self, streams: list[Stream]) -> int:
        view = "interventional" if self.cfg.learner not in ("observational",) else "observational"
        _, stats = encode_rows(streams, Renderer(self.tok), view_authors(view), max_length=self.cfg.max_length)
        return stats.supervised_tokens

    def batch(self, upto: tuple[int, int], latest: tuple[int, int], number: int | None = None) -> Batch:
        """The conversations new since `upto` (up to `latest`, as they stood then), and replayed
        older ones; `number` (the update's, its seed): the next version's unless given (a replay)."""
        cfg = self.cfg
        number = self.versions.next_version() if number is None else number
        new_ids, old_ids = self.store.conversations_since(upto, until=latest)
        new = self.streams(new_ids, latest)
        key = f"serve-replay:{cfg.seed}:{number}"
        replayed = self.streams(replay_sample(old_ids, len(new_ids), cfg.replay, key), latest)
        k = 1
        if cfg.learner in REWARD_LEARNERS:
            new, rest, k = reward_groups(new)
            replayed = rest + replayed  # NLL rows only: not in a reward group
        metrics = {"conversations/new": len(new_ids), "conversations/replayed": len(replayed)}
        return Batch(number, {"exchanges": latest[0], "feedback": latest[1]}, new, replayed, k, metrics)

    # -- the source: the gate's checks ------------------------------------------------------
    def checks(self, seen: dict[str, int]) -> tuple[list[Check], list[str], int]:
        """The control set, then the newest conversations the agent answered well (reward > 0):
        their check is that the rewarded reply's first line comes back."""
        learned = []
        for seq, choice, _ in self.store.rewarded(seen["exchanges"], self.cfg.gate_learned):
            path = self.store.path_segments(seq, choice)
            text = path[-1].text
            for special in self.tok.all_special_tokens:  # the sampled end of turn
                text = text.replace(special, "\n")
            line = text.strip().split("\n")[0].strip()
            if line:
                learned.append(Check(f"learned-{seq}.{choice}", path[:-1], (line,), source=f"exchange {seq}"))
        checks = self.control + learned
        return checks, [c.id for c in checks], len(self.control)

    def ask(self, adapter: str | None, checks: list[Check]) -> list[bool]:
        from dostream.render import decode
        from dostream.sampling import SamplingConfig, sample

        budgets = [c.max_tokens or self.cfg.gate_max_tokens for c in checks]
        prompts = [self.renderer.prompt_ids(Stream(c.id, c.segments)) for c in checks]
        cfg = SamplingConfig(greedy=True, max_new_tokens=max(budgets), batch_size=max(1, len(prompts)))
        out = sample(self._model(adapter), self.tok, prompts, cfg)
        # a greedy row's first M tokens do not depend on the call's budget: cut each to its own
        texts = [decode(self.tok, s.token_ids[:b]) for s, b in zip(out, budgets)]
        return [c.passes(t) for c, t in zip(checks, texts)]

    # -- an update --------------------------------------------------------------------------
    def update(
        self, upto: tuple[int, int], latest: tuple[int, int], number: int | None = None, mark: dict | None = None
    ) -> dict[str, Any]:
        """An update on what is new in (`upto`, `latest`]. A replay (`serve/forget.py`) gives the
        replayed update's `number` (its seed) and a `mark` recorded with its `seen`."""
        t0 = time.time()
        batch = self.batch(upto, latest, number)
        batch.seen.update(mark or {})
        self.running = {"version": batch.step, "started": t0, "new": batch.metrics["conversations/new"]}
        try:
            done = update_once(
                self.cfg, self.model_name, self.tok, self, batch, self.lineage, lock=self._lock, swap=self._swap
            )
        finally:
            self.running = None
        self._counted = None
        self.log(
            f"dostream serve: update {done.version} {'accepted' if done.accepted else 'REJECTED'}: {done.reason} "
            f"({batch.metrics['conversations/new']} new conversations, {time.time() - t0:.1f} s)"
        )
        return {"status": "accepted" if done.accepted else "rejected", **self.version(done.version)}

    # -- listing and rollback ---------------------------------------------------------------
    def version(self, version: int) -> dict[str, Any]:
        row = next(u for u in self.versions.rows() if u["id"] == version)
        return _public(row)

    def listing(self) -> dict[str, Any]:
        rows = self.versions.rows()
        adapter, version = self.versions.in_force()
        start = None if self.lineage.start is None else str(self.lineage.start)
        return {
            "object": "list",
            "current": {"version": version, "adapter": adapter if version else start},
            "learning": self.cfg is not None,
            "running": dict(self.running) if self.running else None,
            "data": [{"version": 0, "kind": "start", "adapter": start, "accepted": True}]
            + [_public(u) for u in rows if u["kind"] == "update"],
            "rollbacks": [_public(u) for u in rows if u["kind"] == "rollback"],
        }

    def rollback(self, version: int | None) -> dict[str, Any]:
        """Put accepted `version` back in force (None: the newest accepted one older than the one
        in force; 0: the adapter the server started with). Raises LookupError / ValueError."""
        with self._lock:
            version, adapter, now = rollback_target(self.lineage, version)
            self._model(adapter)
            rid, reason = record_rollback(self.lineage, version, adapter, now)
            self._swap(adapter)
        self.log(f"dostream serve: {reason}")
        return {"object": "rollback", "id": rid, "current": {"version": version, "adapter": adapter}, "from": now}


def rollback_target(lineage: Lineage, version: int | None) -> tuple[int, str | None, int]:
    """(version, its adapter, the version in force now) of a rollback to accepted `version` (None:
    the newest accepted one older than the one in force). An update whose adapter is gone (a
    `dostream forget` replaced it) is no longer a target. Raises LookupError / ValueError."""
    rows = lineage.versions.rows()
    _, now = lineage.versions.in_force()
    accepted = {0: None}
    for u in rows:
        if u["kind"] == "update" and u["accepted"] and (lineage.root / u["candidate"]).exists():
            accepted[u["id"]] = u["candidate"]
    if version is None:
        older = [v for v in accepted if v < now]
        if not older:
            raise ValueError("version: no earlier accepted version to roll back to")
        version = max(older)
    if version not in accepted:
        raise LookupError(f"version: no accepted version {version} (see GET /v1/adapters)")
    if version == now:
        raise ValueError(f"version: {version} is already in force")
    return version, accepted[version], now


def record_rollback(lineage: Lineage, version: int, adapter: str | None, now: int, why: str = "") -> tuple[int, str]:
    """Record `adapter` (accepted `version`) back in force; returns (the row's id, its reason)."""
    reason = f"rollback from version {now} to {version}{why}"
    seen = {key: lineage.versions.seen_max(key) for key in ("exchanges", "feedback")}
    return lineage.versions.add("rollback", None, True, reason, {}, {}, seen, current=(adapter, version)), reason


def _public(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("kind", "candidate", "accepted", "reason", "gate", "metrics", "created")
    return {"version": row["id"], **{k: row[k] for k in keep}, "adapter_in_force_after": row["current_version"]}


def serving_adapter(lineage: Lineage) -> tuple[Path | None, str | None]:
    """(the directory to load, the name exchanges record) of the adapter the versions say is in
    force; before any update or rollback, the adapter the server was started with."""
    adapter, _ = lineage.versions.in_force()
    if adapter is None:
        return lineage.start, None if lineage.start is None else str(lineage.start)
    return lineage.root / adapter, adapter
