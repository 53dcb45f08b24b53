"""Forget a source: its streams, the memory's notes and counts from them, and what the adapters learned from them.

`dostream forget --store DIR --user ID | --conversation ID | --tenant T` (`cli/forget.py`):

1. **journal**: a `forgets` row (status `started`) names what goes: the conversations (ids only)
   and, per tenant they belong to, the first update that could have read them (the first whose
   recorded marks reach their first exchange: as new or as replayed conversations).
2. **streams** (one transaction, status `deleted`): their exchanges, continuation keys, feedback,
   session items and deliveries. `secure_delete` is on for the store's connection: deleted cells
   are overwritten; the WAL is checkpointed (TRUNCATE) at the end, so no copy is left in the file
   or its WAL.
3. **memory** (status `memory`): `Memory.forget` of each of their streams (and of the user), in
   each affected tenant's memory (`--memory`); a forgotten tenant's memory directory is removed.
4. **adapters** (status `replayed`): per affected lineage, the adapter goes back to the one in
   force before the first update that could have read them (a rollback row), every later update
   is learned again from the same recorded marks with its own seed (`Learner.update(number=)`),
   without them, each gated again (rejected: the previous adapter stays), and the superseded
   updates' adapter directories are removed. A forgotten tenant's lineage is removed whole.
5. **record** (status `done`): what kind of source, a SHA-256 of its id (never the id), the key
   that asked, counts of what went, the versions rolled back and replayed, and whether the replay
   is exact: deterministic where the updates were (the same batch, seed and adapter in force give
   the same adapter bit for bit on CPU in fp32; `tests/serve/test_tenants_slow.py` checks it).

A kill at any point: `resume` (run by every `dostream forget` and at every server start) finishes
a forget whose streams were deleted; one killed before that starts again from its journal (the
conversation ids): it completes, never rolls back. The conversation ids are cleared from the record
once done; one done whose checkpoint did not complete (killed before it, or busy) is checkpointed
again.

Test hook: where the environment variable `DOSTREAM_FORGET_CRASH_AFTER` names a status (or
`rolled-back`: a lineage's rollback row recorded, its replay not yet learned), the process SIGKILLs
itself right after committing it (`tests/serve/test_forget_durability.py`). Unset, nothing happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dostream.learning.cycle import Lineage
from dostream.serve.store import DEFAULT_TENANT, ServeStore, store_path
from dostream.serve.tenants import SNAPSHOTS_SCHEMA, TENANTS, lineage_of, memory_dir, record_snapshot
from dostream.sqlite import transaction

KINDS = ("user", "conversation", "tenant")
CRASH_AFTER = "DOSTREAM_FORGET_CRASH_AFTER"  # the test hook (see the module doc)
SCHEMA = """
CREATE TABLE IF NOT EXISTS forgets (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    tenant TEXT,
    api_key TEXT,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL
);
"""


@dataclass
class Replaying(Lineage):
    """A lineage whose updates land beside the ones they replay: `update-NNNNNN-forgetF`."""

    inner: Lineage | None = None
    forget: int = 0

    def dir_of(self, step: int) -> Path:
        d = self.inner.dir_of(step)
        return d.with_name(f"{d.name}-forget{self.forget}")


def _crash_point(point: str) -> None:
    """The test hook: SIGKILL this process where `DOSTREAM_FORGET_CRASH_AFTER` names `point`."""
    if os.environ.get(CRASH_AFTER) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def target_hash(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


def conversations_of(store: ServeStore, kind: str, value: str, tenant: str | None = None) -> dict[str, list[str]]:
    """{tenant: its conversations} that the source names (in `tenant` only, when given)."""
    if kind == "conversation":
        sql, args = "SELECT tenant, conversation FROM exchanges WHERE conversation = ?", (value,)
    elif kind == "user":
        sql = "SELECT tenant, conversation FROM exchanges WHERE json_extract(request, '$.user') = ?"
        args = (value,)
    else:
        sql, args = "SELECT tenant, conversation FROM exchanges WHERE tenant = ?", (value,)
    if tenant is not None and kind != "tenant":
        sql, args = sql + " AND tenant = ?", (*args, tenant)
    out: dict[str, list[str]] = {}
    for owner, conv in store._all(sql + " GROUP BY tenant, conversation ORDER BY MIN(seq)", args):
        out.setdefault(owner, []).append(conv)
    return out


def _live(lineage: Lineage, superseded: set[int]) -> list[dict[str, Any]]:
    return [r for r in lineage.versions.rows() if r["id"] not in superseded]


def _superseded(store: ServeStore, tenant: str) -> set[int]:
    """Version rows of `tenant` that earlier forgets replaced (their adapters are gone)."""
    out: set[int] = set()
    for (raw,) in store._all("SELECT record FROM forgets"):
        out |= set(json.loads(raw).get("lineages", {}).get(tenant, {}).get("superseded", []))
    return out


def plan(store: ServeStore, lineage: Lineage, tenant: str, conversations: list[str]) -> dict[str, Any]:
    """Which versions of `tenant`'s lineage could have read `conversations`, and where it goes back to."""
    marks = ",".join("?" * len(conversations))
    first = store._one(f"SELECT MIN(seq) FROM exchanges WHERE conversation IN ({marks})", tuple(conversations))[0]
    rows = _live(lineage, _superseded(store, tenant))
    hit = next(
        (i for i, r in enumerate(rows) if r["kind"] == "update" and r["seen"].get("exchanges", -1) >= first), None
    )
    if hit is None:
        return {"replay": [], "superseded": [], "back_to": None}
    before = rows[hit - 1] if hit else None
    back_to = [None, 0] if before is None else [before["current"], before["current_version"]]
    return {"replay": [r["id"] for r in rows[hit:]], "superseded": [r["id"] for r in rows[hit:]], "back_to": back_to}


def _since(store: ServeStore, lineage: Lineage, tenant: str, part: dict[str, Any]) -> list[int]:
    """Versions of `tenant`'s lineage recorded after the plan: a server learning beside a forget
    killed before its replay (its resume waits for the next start) builds on the version that read
    the source. Not the replays of forgets (theirs start from a version without their source)."""
    if not part["replay"]:
        return []
    last = max(part["replay"])
    return [
        r["id"]
        for r in _live(lineage, _superseded(store, tenant))
        if r["id"] > last and r["kind"] == "update" and "forget" not in r["seen"]
    ]


def start(store: ServeStore, kind: str, value: str, key: str | None, tenant: str | None = None) -> int:
    """Journal a forget of source `kind` = `value` (a user or conversation of `tenant` only, when
    given; every tenant's otherwise), status `started`; returns its id."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "tenant":
        tenant = value
    if tenant is not None and tenant not in store.tenants():
        raise ValueError(f"--tenant: no tenant {tenant!r} in {store.path}")
    if kind == "conversation" and tenant is not None:
        value = store.slice(tenant).qualify(value)
    store.db.executescript(SCHEMA)
    found = conversations_of(store, kind, value, tenant)
    lineages = {}
    for tenant, convs in found.items():
        streams = [s.id for c in convs for s in store.conversation_streams(c)]
        lineages[tenant] = {"conversations": convs, "streams": streams}
    record = {"lineages": lineages, "user": value if kind == "user" else None}
    with store.lock:
        transaction(
            store.db,
            [
                (
                    "INSERT INTO forgets (kind, target, tenant, api_key, status, record, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (kind, target_hash(kind, value), tenant, key, "started", json.dumps(record), time.time()),
                )
            ],
        )
        fid = store._one("SELECT MAX(id) FROM forgets")[0]
    _crash_point("started")
    return fid


def _row(store: ServeStore, fid: int) -> tuple[str, str | None, str, dict[str, Any]]:
    kind, tenant, status, raw = store._one("SELECT kind, tenant, status, record FROM forgets WHERE id = ?", (fid,))
    return kind, tenant, status, json.loads(raw)


def _set(store: ServeStore, fid: int, status: str, record: dict[str, Any], extra: list | None = None) -> None:
    finished = time.time() if status == "done" else None
    with store.lock:
        transaction(
            store.db,
            [
                *(extra or []),
                (
                    "UPDATE forgets SET status = ?, record = ?, finished = ? WHERE id = ?",
                    (status, json.dumps(record), finished, fid),
                ),
            ],
        )
    _crash_point(status)


def delete_streams(store: ServeStore, fid: int, store_dir: Path, start_adapter: Path | None) -> None:
    """Step 2: the lineages' plans, then every row of the conversations, in one transaction."""
    kind, tenant, _, record = _row(store, fid)
    statements: list[tuple[str, tuple]] = []
    counts = {"conversations": 0, "exchanges": 0, "feedback": 0}
    for t, part in record["lineages"].items():
        convs = part["conversations"]
        if not convs:
            continue
        lineage = lineage_of(store_dir, t, start_adapter, store.versions)
        part.update(plan(store, lineage, t, convs))
        marks = ",".join("?" * len(convs))
        counts["conversations"] += len(convs)
        counts["exchanges"] += store._one(
            f"SELECT COUNT(*) FROM exchanges WHERE conversation IN ({marks})", tuple(convs)
        )[0]
        counts["feedback"] += store._one(
            f"SELECT COUNT(*) FROM feedback WHERE conversation IN ({marks})", tuple(convs)
        )[0]
        statements += [
            (
                f"DELETE FROM deliveries WHERE exchange IN (SELECT seq FROM exchanges WHERE conversation IN ({marks}))",
                tuple(convs),
            ),
            (f"DELETE FROM session_items WHERE conversation IN ({marks})", tuple(convs)),
            (f"DELETE FROM continuations WHERE conversation IN ({marks})", tuple(convs)),
            (f"DELETE FROM feedback WHERE conversation IN ({marks})", tuple(convs)),
            (f"DELETE FROM exchanges WHERE conversation IN ({marks})", tuple(convs)),
        ]
    if kind == "tenant":
        store.db.executescript(SNAPSHOTS_SCHEMA)
        statements.append(("DELETE FROM snapshots WHERE tenant = ?", (tenant,)))  # its contexts
        if tenant != DEFAULT_TENANT:
            statements.append(("DELETE FROM api_keys WHERE tenant = ?", (tenant,)))  # the tenant is no more
    record["counts"] = counts
    _set(store, fid, "deleted", record, statements)


def forget_memory(store: ServeStore, fid: int, memory: str | Path | None) -> None:
    """Step 3: each affected tenant's memory forgets the streams (and the user)."""
    from dostream.memory.store import Memory

    kind, tenant, _, record = _row(store, fid)
    notes = 0
    for t, part in record["lineages"].items():
        mdir = memory_dir(memory, t)
        if mdir is None or not (mdir / "memory.sqlite").exists():
            continue
        if kind == "tenant" and t != DEFAULT_TENANT:
            shutil.rmtree(mdir)  # the whole memory is the tenant's
            continue
        mem = Memory.open_dir(mdir)
        try:
            gone: set[int] = set()
            for sid in part["streams"]:
                gone |= set(mem.forget(stream=sid))
            if record.get("user") is not None:
                gone |= set(mem.forget(user=record["user"]))
            notes += len(gone)
        finally:
            mem.close()
    record["notes_forgotten"] = notes
    record.pop("user", None)  # the id itself is not kept past here
    _set(store, fid, "memory", record)


def replay(
    store: ServeStore, fid: int, store_dir: Path, start_adapter: Path | None, memory: str | Path | None, make_learner
) -> None:
    """Step 4: per lineage, back to the adapter before the first affected update, then every
    later version replayed without the forgotten conversations. `make_learner(slice, lineage)`
    builds the `serve.learn.Learner` (with the server's --learn config and model) that replays."""
    kind, tenant, _, record = _row(store, fid)
    for t, part in record["lineages"].items():
        if kind == "tenant" and t != DEFAULT_TENANT:
            shutil.rmtree(store_dir / TENANTS / t, ignore_errors=True)  # the whole lineage is the tenant's
            part["replayed"] = []
            continue
        if part.get("back_to") is None or part.get("done"):
            continue
        lineage = lineage_of(store_dir, t, start_adapter, store.versions)
        rows = {r["id"]: r for r in lineage.versions.rows()}
        adapter, version = part["back_to"]
        why = f" (forget {fid}: the last version trained without the forgotten source)"
        if not any(r["kind"] == "rollback" and why in r["reason"] for r in rows.values()):
            from dostream.serve.learn import record_rollback

            since = _since(store, lineage, t, part)
            if since:  # built on a version that read the source: replayed and removed with them
                part["replay"] += since
                part["superseded"] += since
                _set(store, fid, "memory", record)
            record_rollback(lineage, version, adapter, lineage.versions.in_force()[1], why)
            _crash_point("rolled-back")
        replays = [r for r in rows.values() if r["kind"] == "update" and r["seen"].get("forget") == fid]
        done = {r["seen"]["step"]: r for r in replays}
        upto = [-1, -1]
        for r in lineage.versions.rows():  # the marks reached before the first replayed version
            if r["kind"] == "update" and r["id"] < part["replay"][0] and r["id"] not in _superseded(store, t):
                upto = [max(upto[0], r["seen"]["exchanges"]), max(upto[1], r["seen"]["feedback"])]
        out = []
        learner = None
        for vid in part["replay"]:
            orig = rows[vid]
            if orig["kind"] != "update":
                continue  # a rollback among them: the replayed lineage goes on from its own newest
            step = orig["seen"].get("step", orig["id"])
            latest = (orig["seen"]["exchanges"], orig["seen"]["feedback"])
            if step not in done:
                if learner is None:
                    learner = make_learner(
                        store.slice(t),
                        Replaying(lineage.root, lineage.versions, lineage.start, inner=lineage, forget=fid),
                    )
                learner.update(tuple(upto), latest, number=step, mark={"forget": fid, "step": step})
                done = {
                    r["seen"]["step"]: r
                    for r in lineage.versions.rows()
                    if r["kind"] == "update" and r["seen"].get("forget") == fid
                }
            new = done[step]
            out.append({"replaces": vid, "version": new["id"], "accepted": new["accepted"], "reason": new["reason"]})
            upto = [max(upto[0], latest[0]), max(upto[1], latest[1])]
        for vid in part["superseded"]:  # what was learned with the forgotten source: gone from disk
            cand = rows[vid]["candidate"]
            if cand:
                shutil.rmtree((lineage.root / cand).parent, ignore_errors=True)
        part["replayed"], part["done"] = out, True
        _set(store, fid, "memory", record)  # this lineage done: a resume goes on with the next
        if t in store.tenants():
            record_snapshot(store, t, lineage, memory_dir(memory, t), f"forget {fid}")
    _set(store, fid, "replayed", record)


def finish(store: ServeStore, fid: int, device: str) -> dict[str, Any]:
    """Step 5: the record without the conversation ids; the file and its WAL checkpointed."""
    kind, tenant, _, record = _row(store, fid)
    for part in record["lineages"].values():
        part.pop("conversations", None)
        part.pop("streams", None)
    record["replay"] = (
        "deterministic: each update learned again from its recorded marks with its own seed; exact where the "
        f"original updates were deterministic (here: {device})"
    )
    _set(store, fid, "done", record)
    return checkpoint(store, fid)


def checkpoint(store: ServeStore, fid: int) -> dict[str, Any]:
    """The store's file and WAL checkpointed (TRUNCATE): until then the pages the deletion overwrote
    may still be in the file. Recorded as `checkpoint`; a forget done without `complete` there
    (killed before it, or another connection was reading) stays `pending`: the next resume tries again."""
    record = _row(store, fid)[3]
    with store.lock:
        busy = store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    record["checkpoint"] = "complete" if not busy else "busy: another connection reads the store; tried again at resume"
    _set(store, fid, "done", record)
    return listing(store, fid)


def listing(store: ServeStore, fid: int) -> dict[str, Any]:
    cols = ("id", "kind", "target", "tenant", "api_key", "status", "record", "created", "finished")
    row = dict(zip(cols, store._one(f"SELECT {', '.join(cols)} FROM forgets WHERE id = ?", (fid,))))
    row["record"] = json.loads(row["record"])
    return {"object": "forget", **row}


def run(
    store_dir: str | Path,
    fid: int,
    *,
    memory: str | Path | None,
    start_adapter: Path | None,
    make_learner,
    device: str = "cpu",
) -> dict[str, Any]:
    """Take forget `fid` from wherever it stopped to done."""
    store_dir = Path(store_dir)
    store = ServeStore(store_path(store_dir))
    try:
        status = _row(store, fid)[2]
        if status == "started":
            delete_streams(store, fid, store_dir, start_adapter)
            status = "deleted"
        if status == "deleted":
            forget_memory(store, fid, memory)
            status = "memory"
        if status == "memory":
            replay(store, fid, store_dir, start_adapter, memory, make_learner)
            status = "replayed"
        if status != "done":
            return finish(store, fid, device)
        return checkpoint(store, fid) if _row(store, fid)[3].get("checkpoint") != "complete" else listing(store, fid)
    finally:
        store.close()


def pending(store_dir: str | Path) -> list[int]:
    """Forgets not done (killed part way), or done but not checkpointed (`checkpoint`)."""
    path = store_path(store_dir)
    if not path.exists():
        return []
    store = ServeStore(path)
    try:
        store.db.executescript(SCHEMA)
        rows = store._all("SELECT id, status, record FROM forgets ORDER BY id")
        return [i for i, status, raw in rows if status != "done" or json.loads(raw).get("checkpoint") != "complete"]
    finally:
        store.close()
