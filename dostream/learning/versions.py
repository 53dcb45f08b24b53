"""The adapter versions of one lineage: every update and rollback, and the adapter in force after each. Knows no source.

One table, `versions`, in the store of whoever learns (the agent's `store.sqlite`, the server's
`serve.sqlite`), rows only inserted:

    id               the version: 1, 2, ... (0 is the adapter the lineage started with)
    kind             `update` or `rollback`
    candidate        the update's adapter directory, relative to the store's directory (None:
                     nothing was learned)
    accepted         the gate's verdict; `reason` says why
    gate, metrics    JSON: the gate's per-check answers; the learner's numbers
    seen             JSON: how far the source had been read when the update began, in the source's
                     own words (`{"episodes": 16}`, `{"exchanges": 41, "feedback": 12}`); an update
                     is recorded once per point (a unique index)
    current, current_version   the adapter in force after this row

The adapter in force is written in the same transaction as the row that puts it there: a kill
between an adapter landing on disk and its record leaves the previous one in force and the update
to be redone. Stores written before this table (the agent's `updates`, the server's
`adapter_updates`) are copied into it when opened to write, and read through the same conversion
when opened read-only.

>>> from dostream.sqlite import connect
>>> v = Versions(connect(":memory:", VERSIONS_SCHEMA))
>>> v.add("update", "adapters/update-000001/adapter", True, "ok", {}, {}, {"episodes": 8})
1
>>> v.in_force(), v.seen_max("episodes"), v.has_seen("episodes", 8)
(('adapters/update-000001/adapter', 1), 8, True)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from dostream.sqlite import transaction

VERSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    candidate TEXT,
    accepted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    gate TEXT NOT NULL,
    metrics TEXT NOT NULL,
    seen TEXT NOT NULL,
    current TEXT,
    current_version INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_update_once ON versions (seen) WHERE kind = 'update';
"""

COLUMNS = ("id", "kind", "candidate", "accepted", "reason", "gate", "metrics", "seen", "current")
COLUMNS += ("current_version", "created")

# A legacy table's rows in `versions`' shape: (the table's name, rows of it -> rows of versions).
Legacy = tuple[str, Callable[[sqlite3.Connection], list[tuple]]]


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


class Versions:
    """The versions table of one store. `lock` (re-entrant) is the one that serialises every use of
    the connection (the server's threads share it); `legacy` converts a table written before this
    one (see the module doc)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock | None = None, legacy: Legacy | None = None):
        self.db, self.lock = db, lock or threading.RLock()
        self._legacy_rows: list[tuple] | None = None
        if _has_table(db, "versions"):
            if legacy and _has_table(db, legacy[0]) and not self._one("SELECT 1 FROM versions LIMIT 1"):
                rows = legacy[1](db)
                if rows:
                    marks = ", ".join("?" * len(COLUMNS))
                    transaction(db, [(f"INSERT INTO versions VALUES ({marks})", r) for r in rows])
        elif legacy and _has_table(db, legacy[0]):  # a store opened read-only, from before this table
            self._legacy_rows = legacy[1](db)
        else:
            self._legacy_rows = []

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def _rows(self) -> list[tuple]:
        if self._legacy_rows is not None:
            return self._legacy_rows
        with self.lock:
            return self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM versions ORDER BY id").fetchall()

    # -- writing ------------------------------------------------------------------------------
    def add(
        self,
        kind: str,
        candidate: str | None,
        accepted: bool,
        reason: str,
        gate: dict[str, Any],
        metrics: dict[str, Any],
        seen: dict[str, int],
        current: tuple[str | None, int] | None = None,
    ) -> int:
        """Record an update (`kind` "update") or a rollback ("rollback"); returns its version. The
        adapter in force after it, `current` = (adapter, version), goes in the same transaction: an
        accepted update's own candidate unless given, else the one in force before. Recording a
        second update at the same `seen` raises `sqlite3.IntegrityError`."""
        if self._legacy_rows is not None:
            raise RuntimeError("a store opened read-only records no version")
        with self.lock:
            version = self._one("SELECT COALESCE(MAX(id), 0) + 1 FROM versions")[0]
            if current is None:
                current = (candidate, version) if accepted else self.in_force()
            row = (version, kind, candidate, int(accepted), reason, _json(gate), _json(metrics), _json(seen))
            row += (current[0], current[1], time.time())
            transaction(self.db, [(f"INSERT INTO versions VALUES ({', '.join('?' * len(COLUMNS))})", row)])
        return version

    # -- reading ------------------------------------------------------------------------------
    def in_force(self) -> tuple[str | None, int]:
        """(adapter, version) in force after the last update or rollback; (None, 0) before any."""
        rows = self._rows()
        return (None, 0) if not rows else (rows[-1][8], rows[-1][9])

    def rows(self) -> list[dict[str, Any]]:
        """Every version in order, JSON columns parsed."""
        out = []
        for r in self._rows():
            row = dict(zip(COLUMNS, r))
            row.update(accepted=bool(r[3]), gate=json.loads(r[5]), metrics=json.loads(r[6]), seen=json.loads(r[7]))
            out.append(row)
        return out

    def next_version(self) -> int:
        return max([0, *(r[0] for r in self._rows())]) + 1

    def seen_max(self, key: str) -> int:
        """The furthest point `key` of the source that any update has seen; -1 before any."""
        marks = [json.loads(r[7]).get(key, -1) for r in self._rows() if r[1] == "update"]
        return max(marks, default=-1)

    def has_seen(self, key: str, value: int) -> bool:
        """Whether an update was recorded at the point `key` = `value` of the source."""
        return any(json.loads(r[7]).get(key) == value for r in self._rows() if r[1] == "update")


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
