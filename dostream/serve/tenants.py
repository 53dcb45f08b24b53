"""Tenants: one base model; per tenant its own adapter lineage, memory, system context and slice of the store.

A key made with `dostream serve keys add --tenant NAME` belongs to NAME (`serve/auth.py`); a key
made without one, and every row written before tenants, belongs to the default tenant, which is
today's server: its lineage is the store's own (`STORE/adapters/`, `serve.sqlite`'s versions), its
memory is `--memory DIR`. Another tenant NAME has

    STORE/tenants/NAME/versions.sqlite           its adapter versions (`learning/versions.py`)
    STORE/tenants/NAME/adapters/update-NNNNNN/   its updates (`learning/cycle.py`, one lineage)
    MEMORY/tenants/NAME/                         its memory (with `--memory MEMORY`)
    serve.sqlite: exchanges.tenant, feedback.tenant   its slice of the store (`ServeStore.slice`)
    serve.sqlite: snapshots                      its versioned snapshot: (adapter version, memory
                                                 version, context), one row per change; the newest
                                                 row's context is its system context: the first
                                                 segment of each of its new conversations
                                                 (`context`, role system)

Each tenant runs the one learning cycle through its own `serve.learn.Learner` (its slice: it
trains only on its own conversations and is gated on its own rewarded replies and the control
set), swaps its own `ModelSlot`, rolls back its own lineage. `rollback` puts a snapshot back as a
unit: the adapter version, the context and the memory (`memory.rollback`: notes added since the
snapshot's memory version are `rolled_back`, out of retrieval from the next prompt on; notes they
superseded active again; a rollback to a later snapshot brings rolled-back notes back; forgotten
notes stay forgotten; `used`/`helped` counts since the snapshot's time deleted). The memory is
checked first (a rollback its history cannot make exactly is refused before the adapter moves)
and put back in one transaction. Not put back, and the answer says so (`not_restored`): evidence
cited to a kept note since the snapshot and a supersession between two kept notes since (nothing
dates them in the memory file).

Serving a tenant's adapter. A request carries its tenant in `Job.pending.tenant` (`Pending`,
`serve/exchange.py`); `Engines.submit` names the adapter the tenant has in force now on the job
(`Tenants.adapter_of`: `Job.adapter`, the key exchanges record, unique per tenant and version,
`tenants/NAME/adapters/update-NNNNNN/adapter` relative to the store; `Job.adapter_dir`, where to
load it from) and sends it to the server's one engine: rows of every tenant decode together, each
with its own adapter's delta on the shared base (`serve/batcher.py`, loaded on first use, least
recently used first out under `--max-adapters`/`--adapter-cache-mb`). The default tenant's jobs
name no adapter: the model in force, the slot's (a merged adapter after an update: no per-row cost
for a server of one tenant). A tenant with no adapter (the base model: it never learned and the
server was started without `--adapter`) names `batcher.BASE`, so it is answered by the base even
while the default tenant's slot holds a merged adapter. A tenant's new version is a new key: its
rows already decoding finish on the version they started with, rows submitted after it was
recorded decode on the new one. A tenant's own `ModelSlot` (the base with its adapter merged, what
its gate's and memory's tests and prompt scoring use) loads on first use, not to serve it. Where the
one engine cannot add a tenant's adapter per row (an `--adapter` that is a LoRA variant, DoRA and
the like) the tenant gets a `Batcher` of its own over its slot (one more model and sampling thread:
correct, not mixed); `--engine vllm` serves the default tenant's adapter only (501 for another
tenant whose adapter is not the default's).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dostream.learning.cycle import ADAPTERS, Lineage
from dostream.learning.versions import VERSIONS_SCHEMA, Versions
from dostream.serve.keys import DEFAULT_TENANT, check_tenant_name
from dostream.serve.protocol import ApiError
from dostream.serve.store import ServeStore
from dostream.sqlite import connect, transaction

TENANTS = "tenants"  # STORE/tenants/NAME/, MEMORY/tenants/NAME/
SNAPSHOTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    version INTEGER NOT NULL,
    adapter TEXT,
    memory INTEGER NOT NULL,
    context TEXT NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass
class TenantLineage(Lineage):
    """A tenant's lineage: adapters under `ROOT/tenants/NAME/adapters/`, recorded relative to ROOT."""

    name: str = ""

    def dir_of(self, step: int) -> Path:
        return self.root / TENANTS / self.name / ADAPTERS / f"update-{step:06d}"


def lineage_of(store_dir: str | Path, name: str, start: Path | None, default_versions: Versions) -> Lineage:
    """Tenant `name`'s lineage in the store at `store_dir` (the default tenant's: the store's own)."""
    if name == DEFAULT_TENANT:
        return Lineage(Path(store_dir), default_versions, start=start)
    folder = Path(store_dir) / TENANTS / check_tenant_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    db = connect(folder / "versions.sqlite", VERSIONS_SCHEMA, check_same_thread=False)
    db.execute("PRAGMA secure_delete=ON")
    return TenantLineage(Path(store_dir), Versions(db), start=start, name=name)


def memory_dir(memory: str | Path | None, name: str) -> Path | None:
    """Tenant `name`'s memory directory under the server's `--memory` (None: no memory)."""
    if memory is None:
        return None
    return Path(memory) if name == DEFAULT_TENANT else Path(memory) / TENANTS / name


def memory_version(directory: Path | None) -> int:
    """A memory's version: its newest note's id, neither rolled back nor forgotten (0: none, or no
    memory; `memory.rollback.version_of`)."""
    if directory is None or not (directory / "memory.sqlite").exists():
        return 0
    from dostream.memory.rollback import version_of
    from dostream.memory.store import Memory

    mem = Memory.open_dir(directory, read_only=True)
    try:
        return version_of(mem.db)
    finally:
        mem.close()


def roll_back_memory(directory: Path | None, target: dict[str, Any], *, check: bool = False) -> dict[str, Any] | None:
    """Tenant memory at `directory` put back to snapshot `target`'s memory version (None: no
    memory); what the CLI's rollback does (a running server's: `ServedMemory.roll_back`, on the
    connection its retrieval reads). `check`: only raise what it would."""
    from dostream.memory.rollback import Rolled, put_back

    if directory is None:
        return None
    if not (directory / "memory.sqlite").exists():
        if target["memory"]:
            raise ValueError(f"snapshot: its memory version is {target['memory']} and {directory} holds no memory")
        return Rolled(0).to_json()
    from dostream.memory.store import Memory

    mem = Memory.open_dir(directory)
    try:
        return put_back(mem, target["memory"], since=target["created"], check=check)
    finally:
        mem.close()


# -- snapshots: the store's side, no model needed (the CLI's `tenants` commands use these) ------------


def context_of(store: ServeStore, name: str) -> str:
    """Tenant `name`'s system context: its newest snapshot's ('' before any)."""
    rows = snapshots(store, name)
    return rows[-1]["context"] if rows else ""


def snapshots(store: ServeStore, name: str) -> list[dict[str, Any]]:
    if not store._one("SELECT 1 FROM sqlite_master WHERE name = 'snapshots'"):
        return []  # a store no tenant has written to (or one opened read-only from before tenants)
    cols = ("id", "version", "adapter", "memory", "context", "reason", "created")
    rows = store._all(f"SELECT {', '.join(cols)} FROM snapshots WHERE tenant = ? ORDER BY id", (name,))
    return [dict(zip(cols, r)) for r in rows]


def record_snapshot(
    store: ServeStore, name: str, lineage: Lineage, memory: Path | None, reason: str, context: str | None = None
) -> dict[str, Any]:
    """A snapshot of tenant `name` as it stands (the adapter in force, the memory's version, the
    context, or `context` when given: the tenant's context from now on)."""
    adapter, version = lineage.versions.in_force()
    ctx = context_of(store, name) if context is None else context
    row = (name, version, adapter, memory_version(memory), ctx, reason, time.time())
    sql = "INSERT INTO snapshots (tenant, version, adapter, memory, context, reason, created) VALUES (?, ?, ?, ?, ?, ?, ?)"
    with store.lock:
        store.db.executescript(SNAPSHOTS_SCHEMA)
        transaction(store.db, [(sql, row)])
    return snapshots(store, name)[-1]


def reconcile(store: ServeStore, name: str, lineage: Lineage, memory: Path | None) -> None:
    """After a kill between an update's record and its snapshot: the snapshot catches up."""
    rows = snapshots(store, name)
    if not rows or rows[-1]["version"] != lineage.versions.in_force()[1]:
        record_snapshot(store, name, lineage, memory, "the adapter in force" if rows else "first snapshot")


def describe(store: ServeStore, name: str, lineage: Lineage, memory: Path | None) -> dict[str, Any]:
    """What `GET /v1/tenants/{t}` and `dostream serve tenants show` print."""
    adapter, version = lineage.versions.in_force()
    keys = [k["id"] for k in store.keys() if (k["tenant"] or DEFAULT_TENANT) == name and not k["revoked"]]
    return {
        "object": "tenant",
        "id": name,
        "context": context_of(store, name),
        "adapter": {
            "version": version,
            "adapter": adapter if version else (None if lineage.start is None else str(lineage.start)),
        },
        "memory": {"version": memory_version(memory), "directory": None if memory is None else str(memory)},
        "conversations": len(store.conversations(name)),
        "keys": keys,
        "snapshots": snapshots(store, name),
    }


def snapshot_target(store: ServeStore, name: str, snapshot: int | None) -> dict[str, Any]:
    """The snapshot to roll back to (None: the one before the newest). Raises LookupError / ValueError."""
    rows = snapshots(store, name)
    if snapshot is None:
        if len(rows) < 2:
            raise ValueError("snapshot: no earlier snapshot to roll back to")
        return rows[-2]
    found = next((r for r in rows if r["id"] == snapshot), None)
    if found is None:
        raise LookupError("snapshot: no such snapshot of this tenant")
    return found


def rolled_back(row: dict[str, Any], target: dict[str, Any], memory: dict[str, Any] | None) -> dict[str, Any]:
    """What a rollback to snapshot `target` answers: the snapshot it recorded (`row`: `memory` the
    memory's version now, the snapshot's), what it put back (`restored`: the adapter version, the
    context and, with a memory, the memory; `memory_rollback`: the note ids it took out, brought
    back, made active again, superseded again, and the counts it deleted) and what it did not
    (`not_restored`: the memory's citations and supersessions between kept notes since the
    snapshot, which nothing in the memory file dates)."""
    from dostream.memory.rollback import NOT_RESTORED

    return {
        **row,
        "snapshot": target["id"],
        "restored": ["adapter", "context", *(["memory"] if memory is not None else [])],
        "not_restored": list(NOT_RESTORED) if memory is not None else [],
        "memory_at_snapshot": target["memory"],
        "memory_rollback": memory,
    }


# -- the served tenants ---------------------------------------------------------------------------


@dataclass
class Tenant:
    """One tenant's parts in a running server."""

    name: str
    lineage: Lineage
    slot: Any  # `serve.batcher.ModelSlot`: the model with its adapter in force
    learner: Any  # `serve.learn.Learner`
    prepare: Any  # `serve.exchange.Preparer` over its slice
    memory: Any  # `serve.memory.ServedMemory` or None
    memory_dir: Path | None
    engine: Any = None  # its own `Batcher`, once its model is not the default tenant's


class Tenants:
    """The tenants of one `serve.server.Server`, made on first use (a key added while serving
    names a tenant the server had not seen)."""

    def __init__(self, server):
        self.server = server
        self.store: ServeStore = server.store
        self._lock = threading.RLock()
        self._tenants: dict[str, Tenant] = {}
        self.started = False

    def default(self, tenant: Tenant) -> None:
        self._tenants[DEFAULT_TENANT] = tenant
        tenant.learner.on_swap = self._on_swap(tenant)

    def _on_swap(self, t: Tenant):
        # under the learner's lock: takes no lock of the registry's (a rollback holds it, then the learner's)
        return lambda: record_snapshot(self.store, t.name, t.lineage, t.memory_dir, "the adapter in force changed")

    def names(self) -> list[str]:
        return self.store.tenants()

    def of_key(self, kid: str) -> str:
        return DEFAULT_TENANT if kid == "env" else self.store.key_tenant(kid) or DEFAULT_TENANT

    def get(self, name: str) -> Tenant:
        """Tenant `name`'s parts (made now if needed); 404 for a tenant that does not exist."""
        found = self._tenants.get(name)
        if found is not None:
            return found
        with self._lock:
            if name in self._tenants:
                return self._tenants[name]
            if name not in self.store.tenants():
                raise ApiError(404, "tenant: not found for this key", param="tenant", code="not_found")
            self._tenants[name] = t = self._make(name)
            return t

    def _make(self, name: str) -> Tenant:
        from dostream.serve.batcher import ModelSlot
        from dostream.serve.exchange import Preparer
        from dostream.serve.learn import Learner, serving_adapter
        from dostream.serve.memory import ServedMemory

        s, cfg = self.server, self.server.cfg
        lineage = lineage_of(cfg.store, name, s.lineage.start, s.store.versions)
        path, adapter_name = serving_adapter(lineage)
        model, name0, forward = s.slot.get()
        if adapter_name == name0:  # the default tenant's model in force: shared
            slot = ModelSlot(model, adapter_name, forward=forward)
        else:  # its own adapter, merged into a model of its own the first time something reads it
            slot = LazySlot(lambda: s.load(path), adapter_name, fast_step=cfg.fast_step)
        mdir = memory_dir(cfg.memory, name)
        memory = None if mdir is None else ServedMemory(mdir, cfg.memory_k, slot, s.tok)
        piece = self.store.slice(name)
        learner = Learner(
            cfg.learn, model=cfg.model, store=piece, lineage=lineage, tok=s.tok, slot=slot, load=s.load,
            fast_step=cfg.fast_step,
        )  # fmt: skip
        prepare = Preparer(
            piece, s.tok, s.context, client_assistant=cfg.client_assistant, fast_step=cfg.fast_step, memory=memory,
            tenant=name, system=lambda: context_of(self.store, name),
        )  # fmt: skip
        tenant = Tenant(name, lineage, slot, learner, prepare, memory, mdir)
        learner.on_swap = self._on_swap(tenant)
        reconcile(self.store, name, lineage, mdir)
        if self.started:
            learner.start()
        return tenant

    def start(self) -> None:
        with self._lock:
            self.started = True
            for t in self._tenants.values():
                if t.name != DEFAULT_TENANT:
                    t.learner.start()

    def stop(self) -> None:
        with self._lock:
            for t in self._tenants.values():
                if t.name == DEFAULT_TENANT:
                    continue
                t.learner.stop()
                if t.engine is not None:
                    t.engine.stop()
                if t.memory is not None:
                    t.memory.close()

    # -- snapshots, rollback ---------------------------------------------------------------------
    def snapshot(self, name: str, reason: str, context: str | None = None) -> dict[str, Any]:
        t = self.get(name)
        return record_snapshot(self.store, name, t.lineage, t.memory_dir, reason, context)

    def describe(self, name: str) -> dict[str, Any]:
        t = self.get(name)
        return describe(self.store, name, t.lineage, t.memory_dir)

    def rollback(self, name: str, snapshot: int | None) -> dict[str, Any]:
        """Put snapshot `snapshot` of tenant `name` back as a unit: its adapter version (swapped in
        as `POST /v1/adapters/rollback` does), its context and its memory (checked before the
        adapter moves, then put back on the served memory's connection: the next prompt retrieves
        from it). Raises LookupError / ValueError (`memory.rollback.RollbackError` among them)."""
        t = self.get(name)
        with self._lock:
            target = snapshot_target(self.store, name, snapshot)
            since = target["created"]
            if t.memory is not None:
                try:
                    t.memory.roll_back(target["memory"], since, check=True)
                except ValueError as e:
                    raise type(e)(
                        f"snapshot: its memory (version {target['memory']}) cannot be put back: {e}"
                    ) from None
            if target["version"] != t.lineage.versions.in_force()[1]:
                t.learner.rollback(target["version"])
            memory = None if t.memory is None else t.memory.roll_back(target["memory"], since)
            row = record_snapshot(
                self.store, name, t.lineage, t.memory_dir, f"rollback to snapshot {target['id']}", target["context"]
            )
            return rolled_back(row, target, memory)

    def adapter_of(self, name: str) -> tuple[str | None, Path | None]:
        """(key, directory) of the adapter tenant `name` is to be served with now: the key is the
        name exchanges record (unique per tenant and version; None: the base model), the directory
        what to load. What mixed-adapter batching keys its adapter pool by."""
        from dostream.serve.learn import serving_adapter

        path, key = serving_adapter(self.get(name).lineage)
        return key, path

    # -- engines ----------------------------------------------------------------------------------
    def route(self, job):
        """The engine that decodes `job` (see the module doc), `job.adapter` and `job.adapter_dir`
        set to what its tenant is served with now."""
        from dostream.serve.batcher import BASE, Batcher

        s = self.server
        name = getattr(job.pending, "tenant", DEFAULT_TENANT)
        if name == DEFAULT_TENANT:
            return s.engine
        key, path = self.adapter_of(name)
        if not isinstance(s.engine, Batcher):  # --engine vllm: one adapter, the default tenant's
            if key == s.slot.get()[1]:
                return s.engine
            raise ApiError(
                501, "--engine vllm serves the default tenant's adapter only (per-tenant adapters: not yet)",
                type="server_error",
            )  # fmt: skip
        t = self.get(name)
        if t.engine is None:
            job.adapter = BASE if key is None else key
            job.adapter_dir = None if path is None else str(path)
        return s.engine if t.engine is None else t.engine

    def own_engine(self, name: str):
        """Tenant `name`'s own `Batcher` over its slot: where the server's engine cannot add its
        adapter per row (a LoRA variant)."""
        from dostream.serve.batcher import Batcher

        s, t = self.server, self.get(name)
        with self._lock:
            if t.engine is None:
                cfg = s.cfg
                t.engine = Batcher(
                    t.slot, s.tok, s.store, max_rows=cfg.max_batch_rows, gather_s=cfg.gather_ms / 1000,
                    max_queue=cfg.max_queue, prefix_cache=cfg.prefix_cache,
                )  # fmt: skip
                t.engine.on_step = s.engine.on_step
                t.engine.start()
            return t.engine


class LazySlot:
    """A tenant's `ModelSlot` whose model (the base with its adapter merged) is loaded the first
    time it is read: its requests are decoded by the server's engine with the adapter per row, so
    only its gate, its memory's tests, prompt scoring and an engine of its own read it."""

    def __init__(self, load, adapter: str | None, *, fast_step: bool = True):
        from dostream.serve.batcher import ModelSlot

        self._slot, self._load, self._adapter, self._fast = ModelSlot(None, adapter), load, adapter, fast_step
        self._lock = threading.Lock()

    def get(self) -> tuple[object, str | None, object]:
        with self._lock:
            if self._load is not None:
                import torch

                from dostream.cached_forward import CachedForward

                model = self._load()
                with torch.inference_mode():
                    forward = CachedForward.build(model) if self._fast else None
                self._slot.swap(model, self._adapter, forward=forward)
                self._load = None
        return self._slot.get()

    def swap(self, model, adapter: str | None, *, forward=None) -> None:
        with self._lock:
            self._load = None
            self._slot.swap(model, adapter, forward=forward)


class Engines:
    """`Server.batcher`: the `serve.engine.Engine` every route submits to: each job with its
    tenant's adapter named, to the server's engine (`Tenants.route`). Counters and anything else
    are the default engine's."""

    def __init__(self, default, tenants: Tenants):
        object.__setattr__(self, "_default", default)
        object.__setattr__(self, "_tenants", tenants)

    def __getattr__(self, name: str):
        return getattr(self._default, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._default, name, value)

    def submit(self, job):
        engine = self._tenants.route(job)
        try:
            return engine.submit(job)
        except ValueError:  # an adapter the engine cannot add per row (a LoRA variant): its tenant's own engine
            if job.adapter is None:
                raise
            job.adapter = job.adapter_dir = job._lora = None
            return self._tenants.own_engine(job.pending.tenant).submit(job)

    def cancel(self, job) -> None:
        tenant = self._tenants.get(getattr(job.pending, "tenant", DEFAULT_TENANT))
        (tenant.engine or self._default).cancel(job)

    def start(self) -> None:
        self._default.start()

    def stop(self) -> None:
        self._default.stop()
