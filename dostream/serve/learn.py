"""The served agent learns while it serves: updates from its own conversations, a gate, hot swap, rollback.

`dostream serve --learn` runs a `Learner` beside the batcher, on its own thread with its own torch
thread budget (`--learn-threads`; OpenMP's thread count is per thread, so serving keeps its own):

1. trigger: every `--update-every-tokens` supervised tokens (under the learner's view) in the
   conversations that are new since the last update, or `POST /v1/learn` (admin scope);
2. learn: the continual agent's own learner (`agent.learners.learn`: interventional, observational,
   dapo, dual, dual-shared) trains a candidate on the new conversations plus replayed older ones
   (`--replay` per new one), continuing the adapter in force. The learners render plain; a served
   conversation is rendered with the chat template, so each is handed over as `as_plain(stream)`,
   whose plain rendering is its chat rendering (the ids the server conditioned on). The reward
   learners (dapo, dual) learn from groups: a request with n >= 2 choices, each given a reward;
3. gate: the candidate and the adapter in force answer the control set (`--control FILE`, see
   `read_control`) and the latest conversations the agent already answered well (a positive reward
   in feedback: the check is that the reply's first line comes back), greedily. A candidate whose
   success is more than `--gate-tolerance` below the adapter in force is rejected, its reason
   recorded; an accepted one is recorded as the adapter in force in the same transaction as its
   update (`ServeStore.add_adapter_update`) and then swapped in through `ModelSlot`: the batcher
   reads the slot once per batch, so requests in flight finish on the old model and new ones get
   the new one, and no request fails because of a swap.

Adapters live in `STORE/adapters/update-NNNNNN/` (the update's training run; `adapter/`, a PEFT
adapter). A kill at any point: the restarted server serves the adapter the store says is in force;
an update without a record is discarded (its directory removed) and, since the conversations it
had not recorded as seen are still new, redone by the next trigger. `POST /v1/adapters/rollback`
(admin) puts an earlier accepted version back in force (version 0: the adapter the server started
with); `GET /v1/adapters` lists the versions with their gate results and which is in force.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves handler annotations from the module's names

from dostream.config import SupervisedBlock, like, opt
from dostream.openmp import release_pool
from dostream.render import Renderer, encode_rows
from dostream.stream import Segment, Stream, view_authors

SERVE_LEARNERS = ("interventional", "observational", "dapo", "dual", "dual-shared")
POLL_S = 0.5  # how often the learner looks for new conversations
ADAPTERS = "adapters"


@dataclass
class LearnConfig(SupervisedBlock):
    """What `dostream serve --learn` learns, when, and the gate (the LoRA/optimiser/batch fields
    of every update are the shared `config.SupervisedBlock`)."""

    learner: str = opt(
        "interventional",
        "what an update learns (agent/learners.py): interventional (the world's tokens), observational "
        "(every token but the context), dapo (reward of n-choice requests), dual, dual-shared",
        choices=SERVE_LEARNERS,
    )
    update_every_tokens: int = opt(
        2048, "update after this many new supervised tokens (under the learner's view) in new conversations", min=1
    )
    learn_threads: int = opt(1, "torch threads of the learner (serving keeps its own)", min=1)
    control: str = opt("", "the gate's control set: JSONL conversations with a check (docs/design.md); '' none")
    gate_tolerance: float = opt(
        0.0, "reject a candidate whose gate success is more than this below the adapter in force", min=0.0
    )
    gate_learned: int = opt(8, "conversations the agent already answered well (reward > 0) the gate asks again", min=0)
    gate_max_tokens: int = opt(32, "tokens per gate answer (a control line's max_tokens overrides it)", min=1)
    replay: float = opt(1.0, "older conversations replayed per new one in an update", min=0.0)
    epochs: int = like(SupervisedBlock, "epochs", 2)
    max_length: int = like(SupervisedBlock, "max_length", 512)
    seed: int = opt(0, "seed of the replay draws and the updates")


# -- the control set ---------------------------------------------------------------------------


@dataclass
class Check:
    """One gate question: a conversation so far and what a passing reply contains (every string of
    `expect`) and does not (any of `forbid`), ignoring case."""

    id: str
    segments: list[Segment]
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    max_tokens: int = 0  # 0: the gate's default
    source: str = ""

    def passes(self, text: str) -> bool:
        low = text.lower()
        return all(e.lower() in low for e in self.expect) and not any(f.lower() in low for f in self.forbid)


def _strings(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: field '{key}': expected a list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{where}: field '{key}[{i}]': expected a non-empty string")
    return tuple(value)


def read_control(path: str | Path) -> list[Check]:
    """The control set: JSON Lines, one conversation per line,
    `{"id"?, "messages": [OpenAI chat messages], "tools"?, "expect": [str, ...], "forbid"?: [str,
    ...], "max_tokens"?: int}`, at least one string in `expect` or `forbid`. The messages become
    segments as a request's do (`serve.record.new_segments`); the gate samples the next assistant
    turn. A bad line is an error naming the file, the line and the field."""
    from dostream.serve.record import FieldError, new_segments

    checks: list[Check] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--control: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        unknown = sorted(set(obj) - {"id", "messages", "tools", "expect", "forbid", "max_tokens"})
        if unknown:
            raise ValueError(f"{where}: field '{unknown[0]}': unknown field")
        messages, tools = obj.get("messages"), obj.get("tools")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages': expected a non-empty list of chat messages")
        if tools is not None and not isinstance(tools, list):
            raise ValueError(f"{where}: field 'tools': expected a list")
        try:
            segments = new_segments(messages, 0, tools, "teacher")
        except FieldError as e:
            raise ValueError(f"{where}: field '{e.field}': {e.reason}") from None
        expect, forbid = _strings(obj, "expect", where), _strings(obj, "forbid", where)
        if not expect and not forbid:
            raise ValueError(f"{where}: field 'expect': a check needs a string in expect or forbid")
        max_tokens = obj.get("max_tokens", 0)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"{where}: field 'max_tokens': expected a positive integer")
        cid = obj.get("id", f"control-{n}")
        checks.append(Check(str(cid), segments, expect, forbid, max_tokens, where))
    if not checks:
        raise ValueError(f"--control: {path} holds no conversation")
    return checks


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
    """The adapter versions of one server: updates (with `cfg`, on a thread), the gate, the swap,
    rollback, the listing. Without `cfg` (a server not started with --learn) it only lists and rolls back."""

    def __init__(self, server, cfg: LearnConfig | None):
        self.server, self.cfg = server, cfg
        self.store = server.store
        self.dir = Path(server.cfg.store) / ADAPTERS
        self.renderer = Renderer(server.tok, chat_template=True)
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
        self._thread = threading.Thread(target=self._loop, name="dostream-learner", daemon=True)
        if cfg is not None:
            self._discard_unrecorded()

    # -- paths and models -------------------------------------------------------------------
    def path_of(self, adapter: str | None) -> Path | None:
        """A recorded adapter's directory (store-relative); None: the adapter the server started with."""
        if adapter is None:
            return None if self.server.cfg.adapter is None else Path(self.server.cfg.adapter)
        return Path(self.server.cfg.store) / adapter

    def _discard_unrecorded(self) -> None:
        """An update killed before its record: its directory goes (the update is redone)."""
        recorded = {Path(u["candidate"]).parts[1] for u in self.store.adapter_updates() if u["candidate"]}
        for d in sorted(self.dir.glob("update-*")) if self.dir.exists() else []:
            if d.name not in recorded:
                shutil.rmtree(d, ignore_errors=True)

    def _model(self, adapter: str | None):
        """The base model with `adapter` merged, in the server's dtype (cached: in force + candidate)."""
        if adapter not in self._models:
            import torch

            from dostream.models import load_model

            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.server.cfg.dtype]
            path = self.path_of(adapter)
            self._models[adapter] = load_model(self.server.cfg.model, dtype=dtype, adapter=path, merge=path is not None)
        return self._models[adapter]

    def _swap(self, adapter: str | None, model) -> None:
        import torch

        from dostream.cached_forward import CachedForward

        with torch.inference_mode():
            forward = CachedForward.build(model) if self.server.cfg.fast_step else None
        name = adapter if adapter is not None else self.server.cfg.adapter
        self.server.slot.swap(model, None if name is None else str(name), forward=forward)
        self._models = {adapter: model}

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

    def step(self, force: bool = False) -> dict[str, Any] | None:
        """One look: update if forced or enough is new; returns the update's record, or why not."""
        upto = self.store.learned_upto()
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

    # -- data -------------------------------------------------------------------------------
    def streams(self, conversations: list[str]) -> list[Stream]:
        return [as_plain(s, self.renderer) for c in conversations for s in self.store.conversation_streams(c)]

    def supervised_tokens(self, streams: list[Stream]) -> int:
        view = "interventional" if self.cfg.learner not in ("observational",) else "observational"
        _, stats = encode_rows(streams, Renderer(self.server.tok), view_authors(view), max_length=self.cfg.max_length)
        return stats.supervised_tokens

    def agent_config(self, group_size: int):
        from dostream.agent.loop import AgentConfig
        from dostream.config import block_values

        return AgentConfig(
            model=self.server.cfg.model,
            learner=self.cfg.learner,
            group_size=max(1, group_size),
            seed=self.cfg.seed,
            progress=False,
            **block_values(self.cfg, SupervisedBlock),
        )

    # -- an update --------------------------------------------------------------------------
    def update(self, upto: tuple[int, int], latest: tuple[int, int]) -> dict[str, Any]:
        from dostream.agent.learners import REWARD_LEARNERS, learn

        cfg = self.cfg
        t0 = time.time()
        current = self.store.adapter_in_force()
        number = max([0, *(u["id"] for u in self.store.adapter_updates())]) + 1
        out = self.dir / f"update-{number:06d}"
        shutil.rmtree(out, ignore_errors=True)  # a leftover of a killed attempt
        new_ids, old_ids = self.store.conversations_since(upto)
        rng = random.Random(f"serve-replay:{cfg.seed}:{number}")
        new = self.streams(new_ids)
        replayed = self.streams(rng.sample(old_ids, min(len(old_ids), round(cfg.replay * len(new_ids)))))
        k = 1
        if cfg.learner in REWARD_LEARNERS:
            new, rest, k = reward_groups(new)
            replayed = rest + replayed  # NLL rows only: not in a reward group
        self.running = {"version": number, "started": t0, "new": len(new_ids)}
        metrics: dict[str, Any] = {"conversations/new": len(new_ids), "conversations/replayed": len(replayed)}
        try:
            outcome = learn(
                self.agent_config(k), self.server.tok, number, new, replayed, self.path_of(current[0]), out,
                cfg.gate_max_tokens,
            )  # fmt: skip
            metrics.update(outcome.metrics)
            gate: dict[str, Any] = {}
            if outcome.adapter is None:
                accepted, reason, candidate = False, f"nothing learned: {outcome.reason}", None
            else:
                candidate = str(Path(ADAPTERS) / out.name / "adapter")
                accepted, reason, gate = self.gate(current[0], candidate, latest[0])
            metrics["time/started"], metrics["time/finished"] = t0, time.time()
            with self._lock:
                if self.store.adapter_in_force() != current:
                    accepted, reason = False, "the adapter in force changed during the update (a rollback)"
                version = self.store.add_adapter_update("update", candidate, accepted, reason, gate, metrics, latest)
                if accepted:
                    self._swap(candidate, self._model(candidate))
        finally:
            self.running = None
        for done in out.glob("**/checkpoints"):  # recorded: no redo will need them
            shutil.rmtree(done, ignore_errors=True)
        self._counted = None
        self.log(
            f"dostream serve: update {version} {'accepted' if accepted else 'REJECTED'}: {reason} "
            f"({len(new_ids)} new conversations, {time.time() - t0:.1f} s)"
        )
        return {"status": "accepted" if accepted else "rejected", **self.version(version)}

    # -- the gate ---------------------------------------------------------------------------
    def checks(self, upto: int) -> list[Check]:
        """The control set, then the newest conversations the agent answered well (reward > 0):
        their check is that the rewarded reply's first line comes back."""
        learned = []
        for seq, choice, _ in self.store.rewarded(upto, self.cfg.gate_learned):
            path = self.store.path_segments(seq, choice)
            text = path[-1].text
            for special in self.server.tok.all_special_tokens:  # the sampled end of turn
                text = text.replace(special, "\n")
            line = text.strip().split("\n")[0].strip()
            if line:
                learned.append(Check(f"learned-{seq}.{choice}", path[:-1], (line,), source=f"exchange {seq}"))
        return self.control + learned

    def answers(self, adapter: str | None, checks: list[Check]) -> list[bool]:
        from dostream.render import decode
        from dostream.sampling import SamplingConfig, sample

        budgets = [c.max_tokens or self.cfg.gate_max_tokens for c in checks]
        prompts = [self.renderer.prompt_ids(Stream(c.id, c.segments)) for c in checks]
        cfg = SamplingConfig(greedy=True, max_new_tokens=max(budgets), batch_size=max(1, len(prompts)))
        out = sample(self._model(adapter), self.server.tok, prompts, cfg)
        # a greedy row's first M tokens do not depend on the call's budget: cut each to its own
        texts = [decode(self.server.tok, s.token_ids[:b]) for s, b in zip(out, budgets)]
        return [c.passes(t) for c, t in zip(checks, texts)]

    def gate(self, current: str | None, candidate: str, upto: int) -> tuple[bool, str, dict[str, Any]]:
        checks = self.checks(upto)
        if not checks:
            return True, "no gate (no control set, nothing answered well yet)", {}
        before, after = self.answers(current, checks), self.answers(candidate, checks)
        b, a = sum(before) / len(checks), sum(after) / len(checks)
        tol = self.cfg.gate_tolerance
        accepted = a >= b - tol
        reason = f"gate success {a:.2f} vs {b:.2f} in force (n={len(checks)}, tolerance {tol})" + (
            "" if accepted else ": regression, the adapter in force stays"
        )
        gate = {
            "n": len(checks),
            "control": len(self.control),
            "before": b,
            "after": a,
            "tolerance": tol,
            "checks": [{"id": c.id, "before": x, "after": y} for c, x, y in zip(checks, before, after)],
        }
        return accepted, reason, gate

    # -- listing and rollback ---------------------------------------------------------------
    def version(self, version: int) -> dict[str, Any]:
        row = next(u for u in self.store.adapter_updates() if u["id"] == version)
        return _public(row)

    def listing(self) -> dict[str, Any]:
        rows = self.store.adapter_updates()
        adapter, version = self.store.adapter_in_force()
        start = {"version": 0, "kind": "start", "adapter": self.server.cfg.adapter, "accepted": True}
        return {
            "object": "list",
            "current": {"version": version, "adapter": adapter if version else self.server.cfg.adapter},
            "learning": self.cfg is not None,
            "running": dict(self.running) if self.running else None,
            "data": [start] + [_public(u) for u in rows if u["kind"] == "update"],
            "rollbacks": [_public(u) for u in rows if u["kind"] == "rollback"],
        }

    def rollback(self, version: int | None) -> dict[str, Any]:
        """Put accepted `version` back in force (None: the newest accepted one older than the one
        in force; 0: the adapter the server started with). Raises LookupError / ValueError."""
        with self._lock:
            rows = self.store.adapter_updates()
            _, now = self.store.adapter_in_force()
            accepted = {0: None, **{u["id"]: u["candidate"] for u in rows if u["kind"] == "update" and u["accepted"]}}
            if version is None:
                older = [v for v in accepted if v < now]
                if not older:
                    raise ValueError("version: no earlier accepted version to roll back to")
                version = max(older)
            if version not in accepted:
                raise LookupError(f"version: no accepted version {version} (see GET /v1/adapters)")
            if version == now:
                raise ValueError(f"version: {version} is already in force")
            adapter = accepted[version]
            model = self._model(adapter)
            reason = f"rollback from version {now} to {version}"
            rid = self.store.add_adapter_update(
                "rollback", None, True, reason, {}, {}, self.store.learned_upto(), current=(adapter, version)
            )
            self._swap(adapter, model)
        self.log(f"dostream serve: {reason}")
        return {"object": "rollback", "id": rid, "current": {"version": version, "adapter": adapter}, "from": now}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("kind", "candidate", "accepted", "reason", "gate", "metrics", "created")
    return {"version": row["id"], **{k: row[k] for k in keep}, "adapter_in_force_after": row["current_version"]}


def adapter_in_force(store, start: str | None) -> tuple[str | None, str | None]:
    """(the directory to load, the name exchanges record) of the adapter the store says is in
    force; before any update or rollback, the adapter the server was started with (`start`)."""
    adapter, _ = store.adapter_in_force()
    if adapter is None:
        return start, None if start is None else str(start)
    return str(Path(store.path).parent / adapter), adapter


# -- HTTP --------------------------------------------------------------------------------------


def install(app, server) -> None:
    """`POST /v1/learn`, `GET /v1/adapters`, `POST /v1/adapters/rollback` on the server's app."""
    import asyncio

    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from dostream.serve.protocol import ApiError, bad, parse_json

    learner: Learner = server.learner

    async def body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > server.cfg.limits.max_body:
            raise ApiError(413, "body: larger than this server's limit", param="body", code="request_too_large")
        obj = parse_json(raw) if raw.strip() else {}
        if not isinstance(obj, dict):
            raise bad("body", "expected a JSON object")
        return obj

    @app.post("/v1/learn")
    async def learn_now(request: Request):
        server.auth.check(request.headers.get("authorization"), "admin")
        obj = await body(request)
        wait = obj.get("wait", False)
        if not isinstance(wait, bool):
            raise bad("wait", "expected true or false")
        if learner.cfg is None:
            raise ApiError(409, "this server does not learn: start it with --learn", code="not_learning")
        future = learner.trigger()
        if not wait:
            return JSONResponse({"object": "learn", "status": "queued"}, status_code=202)
        return {"object": "learn", **await asyncio.wrap_future(future)}

    @app.get("/v1/adapters")
    async def adapters(request: Request):
        server.auth.check(request.headers.get("authorization"), "chat")
        return await run_in_threadpool(learner.listing)

    @app.post("/v1/adapters/rollback")
    async def rollback(request: Request):
        server.auth.check(request.headers.get("authorization"), "admin")
        obj = await body(request)
        version = obj.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise bad("version", "expected an integer")
        try:
            return await run_in_threadpool(learner.rollback, version)
        except LookupError as e:
            raise ApiError(404, str(e).strip("'\""), param="version") from None
        except ValueError as e:
            raise ApiError(409, str(e), param="version") from None
