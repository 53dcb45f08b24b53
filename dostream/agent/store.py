"""The continual agent's memory: an append-only SQLite store (WAL mode) of everything that happened.

Three tables, rows only ever inserted:

    episodes  one per acted episode, in order (`seq` 0, 1, 2, ...): the stream as JSON, exact agent
              token ids included, the reward, the success flag and the adapter that acted
    versions  one per attempted update (`learning/versions.py`, the table every learner shares): the
              episodes it had seen, the candidate adapter's path, accepted or rejected and why,
              the gate's answers; the adapter in force after it
    evals     one per evaluation: split, episodes seen so far, successes out of n

The adapter in force is the `current` column of the last `versions` row, written in the same
transaction as that update's record: a kill between the adapter file landing on disk and the
record leaves the previous adapter in force and the update to be redone. `seq` is the primary key
and a batch of episodes goes in as one transaction, so a resumed run can neither lose nor repeat
an episode.

>>> store = Store(":memory:")
>>> store.add_episodes([(0, Stream("e0", [Segment("context", "Q")], {"success": True}), None)])
>>> store.n_episodes(), store.current_adapter()
(1, None)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dostream.learning.versions import VERSIONS_SCHEMA, Versions
from dostream.sqlite import connect, open_read_only, transaction
from dostream.stream import Segment, Stream, stored_stream  # noqa: F401  (Segment: the doctest)

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    stream TEXT NOT NULL,
    reward REAL NOT NULL,
    success INTEGER NOT NULL,
    adapter TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    id INTEGER PRIMARY KEY,
    split TEXT NOT NULL,
    after_episodes INTEGER NOT NULL,
    successes INTEGER NOT NULL,
    n INTEGER NOT NULL,
    adapter TEXT,
    created REAL NOT NULL,
    UNIQUE (split, after_episodes)
);
"""


class Store:
    """One run's store. Every write is one transaction; readers never see half a batch."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = str(path)
        self.db = open_read_only(self.path, SCHEMA) if read_only else connect(self.path, SCHEMA + VERSIONS_SCHEMA)
        self.versions = Versions(self.db, legacy=("updates", _legacy_updates))

    def close(self) -> None:
        self.db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple]]) -> None:
        transaction(self.db, statements)

    # -- episodes ---------------------------------------------------------------------------
    def add_episodes(self, episodes: list[tuple[int, Stream, str | None]]) -> None:
        """Append (seq, stream, adapter) rows in one transaction; `seq` must continue the sequence."""
        start = self.n_episodes()
        seqs = [seq for seq, _, _ in episodes]
        if seqs != list(range(start, start + len(seqs))):
            raise RuntimeError(f"episodes must continue the sequence at {start}, got seq {seqs[:3]}...")
        now = time.time()
        self._tx(
            (
                "INSERT INTO episodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    s.id,
                    json.dumps(s.to_json()),
                    float(s.meta.get("reward", 0.0)),
                    int(bool(s.meta.get("success"))),
                    adapter,
                    now,
                ),
            )
            for seq, s, adapter in episodes
        )

    def n_episodes(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM episodes").fetchone()[0]

    def episodes(self, start: int = 0, stop: int | None = None) -> list[Stream]:
        """Streams with `start <= seq < stop`, in order."""
        rows = self.db.execute(
            "SELECT seq, stream FROM episodes WHERE seq >= ? AND seq < ? ORDER BY seq",
            (start, stop if stop is not None else 1 << 62),
        ).fetchall()
        return [stored_stream(raw, f"{self.path} (episodes, seq {seq})") for seq, raw in rows]

    def successes(self) -> list[tuple[int, bool, str | None]]:
        """(seq, success, adapter) per episode, in order: the success-over-time curve."""
        return [
            (s, bool(ok), a) for s, ok, a in self.db.execute("SELECT seq, success, adapter FROM episodes ORDER BY seq")
        ]

    # -- updates (the versions table) -------------------------------------------------------
    def add_update(
        self,
        after_episodes: int,
        candidate: str | None,
        accepted: bool,
        reason: str,
        metrics: dict[str, Any],
        gate: dict[str, Any] | None = None,
    ) -> None:
        """Record an update; if accepted, `candidate` becomes the adapter in force (same transaction).
        One update per boundary: a second at `after_episodes` raises `sqlite3.IntegrityError`."""
        self.versions.add("update", candidate, accepted, reason, gate or {}, metrics, {"episodes": after_episodes})

    def current_adapter(self) -> str | None:
        return self.versions.in_force()[0]

    def updates(self) -> list[dict[str, Any]]:
        keep = ("candidate", "accepted", "reason", "current", "metrics", "gate")
        return [
            {"after_episodes": v["seen"]["episodes"], **{k: v[k] for k in keep}}
            for v in self.versions.rows()
            if v["kind"] == "update"
        ]

    def has_update(self, after_episodes: int) -> bool:
        return self.versions.has_seen("episodes", after_episodes)

    # -- evaluations ------------------------------------------------------------------------
    def add_eval(self, split: str, after_episodes: int, successes: int, n: int, adapter: str | None) -> None:
        self._tx(
            [
                (
                    "INSERT INTO evals (split, after_episodes, successes, n, adapter, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (split, after_episodes, successes, n, adapter, time.time()),
                )
            ]
        )

    def has_eval(self, split: str, after_episodes: int) -> bool:
        return (
            self.db.execute(
                "SELECT 1 FROM evals WHERE split = ? AND after_episodes = ?", (split, after_episodes)
            ).fetchone()
            is not None
        )

    def evals(self, split: str | None = None) -> list[dict[str, Any]]:
        cols = ("split", "after_episodes", "successes", "n", "adapter")
        sql = f"SELECT {', '.join(cols)} FROM evals" + (" WHERE split = ?" if split else "") + " ORDER BY id"
        return [dict(zip(cols, r)) for r in self.db.execute(sql, (split,) if split else ())]


def _legacy_updates(db) -> list[tuple]:
    """The `updates` table of stores written before `versions`, as versions rows."""
    rows = db.execute(
        "SELECT id, after_episodes, candidate, accepted, reason, current, metrics, created FROM updates ORDER BY id"
    ).fetchall()
    out, in_force = [], 0
    for rid, after, candidate, accepted, reason, current, metrics, created in rows:
        in_force = rid if accepted else in_force
        seen = json.dumps({"episodes": after})
        out.append((rid, "update", candidate, accepted, reason, "{}", metrics, seen, current, in_force, created))
    return out
