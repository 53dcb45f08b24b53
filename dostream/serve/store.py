"""The served agent's memory: an append-only SQLite store (WAL) of every exchange, its feedback, and the API keys.

`DIR/serve.sqlite`, opened the way every dostream store is (`sqlite.connect`):

    exchanges      one per answered request, in commit order (`seq` 0, 1, 2, ...): its conversation,
                   the exchange (and choice) whose sample it continues, the world's segments that are
                   new in the request (the client's messages after the matched prefix), one `agent`
                   segment per choice with its exact sampled ids, the settings, the adapter in force
    continuations  per choice, the hash of (tools, the request's messages + the returned assistant
                   message): a later request that starts with those messages continues that choice
    feedback       one per `POST /v1/feedback`: the exchange and choice it speaks of, its author
                   (`verifier`, `oracle`, `user`, ...), its text, an optional reward
    versions       one per update of the served adapter (`serve/learn.py`) or rollback: the
                   candidate, accepted or rejected and why, the gate's results, the exchanges and
                   feedback it had seen; `current`: the adapter in force after it (same transaction);
                   the table every learner shares (`learning/versions.py`)
    api_keys       one per key made by `dostream serve keys add`: its id, a SHA-256 of the key (the
                   key itself is shown once and never stored), scopes, revocation time

A conversation is a tree: a client that regenerates a turn, or asks for `n > 1` choices and goes
on with one, branches it. Its stream is the path from the root to the newest exchange (choice 0
there); `export_streams` writes it under the conversation's id, and every other leaf as the stream
`CONVERSATION#SEQ.CHOICE` (same prefix, other ending). Feedback follows the last exchange of every
path through the exchange it speaks of: it arrived after that turn was sampled, so no prompt the
agent was sampled from ever contained it (what was conditioned on stays a prefix of what is trained
on, docs/design.md invariant 2).

Rows are only inserted (a key's revocation time is the one update). A batch of exchanges, with
their continuation keys, is one transaction: after a kill at any point an exchange is there whole
or not at all, and the server answers a request only after its transaction committed.

>>> store = ServeStore(":memory:")
>>> seq = store.add_exchanges([Exchange("chatcmpl-1", "c1", None, None, [Segment("user", "Hi")],
...     [Segment("agent", "Hello", token_ids=[19556])], {}, None, None, ["k"])])
>>> [s.id for s in store.export_streams()], store.find_continuation(["k"])
(['c1'], (0, 0, 0, 'c1'))
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dostream.learning.versions import VERSIONS_SCHEMA, Versions
from dostream.serve.keys import DEFAULT_TENANT, SCOPES, ApiKeys, check_tenant_name, hash_key  # noqa: F401
from dostream.serve.session_log import SCHEMA as SESSION_SCHEMA
from dostream.serve.session_log import SessionLog
from dostream.serve.slices import Slice
from dostream.sqlite import StoreError, connect, open_read_only, transaction
from dostream.stream import Segment, Stream, stored_segments

FILENAME = "serve.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    conversation TEXT NOT NULL,
    parent INTEGER,
    parent_choice INTEGER,
    segments TEXT NOT NULL,
    samples TEXT NOT NULL,
    request TEXT NOT NULL,
    adapter TEXT,
    api_key TEXT,
    created REAL NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS exchanges_by_conversation ON exchanges (conversation, seq);
CREATE TABLE IF NOT EXISTS continuations (
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    choice INTEGER NOT NULL,
    conversation TEXT NOT NULL,
    PRIMARY KEY (key, seq, choice)
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    conversation TEXT NOT NULL,
    exchange INTEGER NOT NULL,
    choice INTEGER NOT NULL,
    author TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    role TEXT,
    reward REAL,
    meta TEXT NOT NULL,
    api_key TEXT,
    created REAL NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS feedback_by_conversation ON feedback (conversation, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    tenant TEXT
);
"""

# Columns added to a table after stores were written with it: (table, column, declaration).
ADDED_COLUMNS = (
    ("exchanges", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("feedback", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("api_keys", "tenant", "TEXT"),
)


def store_path(directory: str | Path) -> Path:
    return Path(directory) / FILENAME


@dataclass
class Exchange:
    """One answered request, as recorded."""

    id: str  # the completion id returned to the client (`chatcmpl-...`)
    conversation: str
    parent: int | None  # seq of the exchange whose sample this one continues; None: a new root
    parent_choice: int | None
    segments: list[Segment]  # the world's segments new in this request, in order
    samples: list[Segment]  # one `agent` segment per choice, exact sampled ids
    request: dict[str, Any]  # settings, seed, finish reasons, usage, the client's own fields
    adapter: str | None
    api_key: str | None
    continuations: list[str] = field(default_factory=list)  # one key per choice
    tenant: str = DEFAULT_TENANT  # whose conversation (`serve/tenants.py`)


@dataclass
class Feedback:
    id: str
    conversation: str
    exchange: int
    choice: int
    author: str
    kind: str
    text: str
    role: str | None
    reward: float | None
    meta: dict[str, Any]
    api_key: str | None
    created: float = 0.0
    tenant: str = DEFAULT_TENANT


def _segments(raw: str, where: str) -> list[Segment]:
    return stored_segments(raw, where)


def _dump(segments: list[Segment]) -> str:
    return json.dumps([s.to_json() for s in segments], ensure_ascii=False)


class ServeStore(ApiKeys):
    """The server's store. One connection shared by the request threads and the batcher, under a
    lock (SQLite serialises writers anyway); every write is one transaction."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = str(path)
        if read_only:
            self.db = open_read_only(self.path, SCHEMA, check_same_thread=False)
        else:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.db = connect(self.path, SCHEMA + VERSIONS_SCHEMA + SESSION_SCHEMA, check_same_thread=False)
            for table, column, declaration in ADDED_COLUMNS:
                if column not in self._columns(table):
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self.db.execute("CREATE INDEX IF NOT EXISTS exchanges_by_tenant ON exchanges (tenant, seq)")
            self.db.execute("PRAGMA secure_delete=ON")  # what `dostream forget` deletes is overwritten in the file
        # A store from before tenants, opened read-only: its rows are all the default tenant's.
        self.tenanted = "tenant" in self._columns("exchanges")
        self.lock = threading.RLock()
        self.sessions = SessionLog(self)  # sessions' committed items and deliveries (`serve/sessions.py`)
        # The adapter versions (`learning/versions.py`, the table every learner shares).
        self.versions = Versions(self.db, self.lock, legacy=("adapter_updates", _legacy_adapter_updates))

    @classmethod
    def open_dir(cls, directory: str | Path, *, read_only: bool = False) -> ServeStore:
        return cls(store_path(directory), read_only=read_only)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}

    def _of(self, tenant: str | None, alias: str = "") -> tuple[str, tuple]:
        """(an SQL condition, its args) keeping `tenant`'s rows (None: every tenant's)."""
        if tenant is None:
            return "1", ()
        if not self.tenanted:
            return ("1", ()) if tenant == DEFAULT_TENANT else ("0", ())
        return f"{alias}tenant = ?", (tenant,)

    def slice(self, tenant: str):
        """The part of the store that is `tenant`'s: what its preparer, learner and export read
        (`serve.slices.Slice`)."""
        return Slice(self, tenant)

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # -- exchanges --------------------------------------------------------------------------
    def add_exchanges(self, exchanges: list[Exchange]) -> list[int]:
        """Append exchanges (and their continuation keys) in one transaction; returns their seqs."""
        now = time.time()
        with self.lock:
            start = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM exchanges").fetchone()[0]
            statements: list[tuple[str, tuple]] = []
            for k, e in enumerate(exchanges):
                seq = start + k
                statements.append(
                    (
                        "INSERT INTO exchanges (seq, id, conversation, parent, parent_choice, segments, samples, "
                        "request, adapter, api_key, created, tenant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            seq,
                            e.id,
                            e.conversation,
                            e.parent,
                            e.parent_choice,
                            _dump(e.segments),
                            _dump(e.samples),
                            json.dumps(e.request, ensure_ascii=False),
                            e.adapter,
                            e.api_key,
                            now,
                            e.tenant,
                        ),
                    )
                )
                statements += [
                    ("INSERT OR IGNORE INTO continuations VALUES (?, ?, ?, ?)", (key, seq, c, e.conversation))
                    for c, key in enumerate(e.continuations)
                ]
            transaction(self.db, statements)
        return list(range(start, start + len(exchanges)))

    def n_exchanges(self) -> int:
        return self._one("SELECT COUNT(*) FROM exchanges")[0]

    def find_continuation(
        self, keys: list[str], conversation: str | None = None, tenant: str | None = None
    ) -> tuple[int, int, int, str] | None:
        """The longest prefix a recorded choice continues: `keys[i]` is the key of the request's
        first i+1 messages (None where message i is not an assistant's). Returns (i, seq, choice,
        conversation) of the newest match, or None; `conversation` and `tenant` restrict the search."""
        own, own_args = self._of(tenant, "e.")
        for i in range(len(keys) - 1, -1, -1):
            if keys[i] is None:
                continue
            sql = (
                "SELECT c.seq, c.choice, c.conversation FROM continuations c JOIN exchanges e ON e.seq = c.seq "
                f"WHERE c.key = ? AND {own}"
            )
            args: tuple = (keys[i], *own_args)
            if conversation is not None:
                sql, args = sql + " AND c.conversation = ?", (*args, conversation)
            row = self._one(sql + " ORDER BY c.seq DESC, c.choice LIMIT 1", args)
            if row is not None:
                return i, row[0], row[1], row[2]
        return None

    def path_segments(self, seq: int, choice: int) -> list[Segment]:
        """The stream up to and including choice `choice` of exchange `seq`: every ancestor's new
        segments and the sample it was continued from, exact ids kept."""
        parts: list[list[Segment]] = []
        node: tuple[int, int] | None = (seq, choice)
        while node is not None:
            row = self._one("SELECT parent, parent_choice, segments, samples FROM exchanges WHERE seq = ?", (node[0],))
            if row is None:
                raise KeyError(f"exchange {node[0]} is not in the store")
            where = f"{self.path} (exchanges, seq {node[0]})"
            parts.append(_segments(row[2], where) + [_segments(row[3], where)[node[1]]])
            node = None if row[0] is None else (row[0], row[1])
        return [s for part in reversed(parts) for s in part]

    def continuation_key(self, seq: int, choice: int) -> str | None:
        """The continuation key recorded for choice `choice` of exchange `seq`."""
        row = self._one("SELECT key FROM continuations WHERE seq = ? AND choice = ?", (seq, choice))
        return None if row is None else row[0]

    def exchange(self, completion_id: str, tenant: str | None = None) -> tuple[int, str, int] | None:
        """(seq, conversation, number of choices) of a completion id (`tenant`'s only), or None."""
        own, args = self._of(tenant)
        row = self._one(
            f"SELECT seq, conversation, samples FROM exchanges WHERE id = ? AND {own}", (completion_id, *args)
        )
        return None if row is None else (row[0], row[1], len(json.loads(row[2])))

    def latest_exchange(self, conversation: str, tenant: str | None = None) -> int | None:
        own, args = self._of(tenant)
        row = self._one(f"SELECT MAX(seq) FROM exchanges WHERE conversation = ? AND {own}", (conversation, *args))
        return None if row is None else row[0]

    def has_conversation(self, conversation: str, tenant: str | None = None) -> bool:
        own, args = self._of(tenant)
        sql = f"SELECT 1 FROM exchanges WHERE conversation = ? AND {own} LIMIT 1"
        return self._one(sql, (conversation, *args)) is not None

    def tenant_of(self, conversation: str) -> str | None:
        """The tenant whose conversation this is; None: no such conversation."""
        if not self.tenanted:
            return DEFAULT_TENANT if self.has_conversation(conversation) else None
        row = self._one("SELECT tenant FROM exchanges WHERE conversation = ? LIMIT 1", (conversation,))
        return None if row is None else row[0]

    # -- feedback ---------------------------------------------------------------------------
    def add_feedback(self, fb: Feedback) -> None:
        with self.lock:
            transaction(
                self.db,
                [
                    (
                        "INSERT INTO feedback (id, conversation, exchange, choice, author, kind, text, role, reward, "
                        "meta, api_key, created, tenant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            fb.id,
                            fb.conversation,
                            fb.exchange,
                            fb.choice,
                            fb.author,
                            fb.kind,
                            fb.text,
                            fb.role,
                            fb.reward,
                            json.dumps(fb.meta, ensure_ascii=False),
                            fb.api_key,
                            fb.created or time.time(),
                            fb.tenant,
                        ),
                    )
                ],
            )

    def feedback_ids(self) -> list[str]:
        return [r[0] for r in self._all("SELECT id FROM feedback ORDER BY seq")]

    # -- export -----------------------------------------------------------------------------
    def conversations(self, tenant: str | None = None) -> list[str]:
        """Conversation ids (`tenant`'s; None: everyone's) in the order of their first exchange."""
        own, args = self._of(tenant)
        sql = f"SELECT conversation FROM exchanges WHERE {own} GROUP BY conversation ORDER BY MIN(seq)"
        return [r[0] for r in self._all(sql, args)]

    def export_streams(self, start: int = 0, stop: int | None = None, tenant: str | None = None) -> list[Stream]:
        """The streams of conversations `start <= i < stop` (in order of their first exchange):
        per conversation its main path (id: the conversation's) and then its other branches."""
        out: list[Stream] = []
        for conv in self.conversations(tenant)[start:stop]:
            out += self.conversation_streams(conv)
        return out

    def _meta(self, feedback: str, raw: str) -> dict[str, Any]:
        try:
            meta = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict):
            raise StoreError(f"{self.path} (feedback {feedback}): field 'meta': not a stored JSON object")
        return meta

    def conversation_streams(self, conversation: str, until: tuple[int, int] | None = None) -> list[Stream]:
        """The conversation's streams; `until` (exchange seq, feedback seq): as they stood once
        those were the newest rows (what an update that read the store then saw)."""
        ex_to, fb_to = until if until is not None else (1 << 62, 1 << 62)
        rows = self._all(
            "SELECT seq, id, parent, parent_choice, segments, samples, adapter FROM exchanges "
            "WHERE conversation = ? AND seq <= ? ORDER BY seq",
            (conversation, ex_to),
        )
        feedback = self._all(
            "SELECT id, exchange, choice, author, kind, text, role, reward, meta, created FROM feedback "
            "WHERE conversation = ? AND seq <= ? ORDER BY seq",
            (conversation, fb_to),
        )
        ex = {r[0]: r for r in rows}
        where = {r[0]: f"{self.path} (exchanges, seq {r[0]})" for r in rows}
        samples = {r[0]: _segments(r[5], where[r[0]]) for r in rows}
        continued = {(r[2], r[3]) for r in rows if r[2] is not None}
        leaves = [(r[0], c) for r in rows for c in range(len(samples[r[0]])) if (r[0], c) not in continued]
        main = (rows[-1][0], 0) if rows else None
        leaves.sort(key=lambda leaf: (leaf != main, leaf))
        streams = []
        for leaf in leaves:
            path: list[tuple[int, int]] = []
            node: tuple[int, int] | None = leaf
            while node is not None:
                path.append(node)
                r = ex[node[0]]
                node = None if r[2] is None else (r[2], r[3])
            path.reverse()
            on_path = set(path)
            segments: list[Segment] = []
            for seq, choice in path:
                segments += _segments(ex[seq][4], where[seq]) + [samples[seq][choice]]
            notes, reward = [], None
            for fid, fseq, fchoice, author, kind, text, role, r_, fmeta, _created in feedback:
                if (fseq, fchoice) not in on_path:
                    continue
                if text:
                    segments.append(Segment(author, text, role=role, meta={"feedback": fid, "kind": kind}))
                if r_ is not None:
                    reward = r_
                notes.append({"id": fid, "author": author, "kind": kind, "reward": r_, **self._meta(fid, fmeta)})
            meta: dict[str, Any] = {
                "source": "serve",
                "conversation": conversation,
                "completions": [ex[seq][1] for seq, _ in path],
                "adapters": [ex[seq][6] for seq, _ in path],
                "turns": len(path),
                "done": False,
            }
            if reward is not None:
                meta["reward"] = reward
            if notes:
                meta["feedback"] = notes
            sid = conversation if leaf == main else f"{conversation}#{leaf[0]}.{leaf[1]}"
            if leaf != main:
                meta["branch"] = f"{leaf[0]}.{leaf[1]}"
            streams.append(Stream(sid, segments, meta))
        seqs = {id(samples[r[0]][c]): r[0] for r in rows for c in range(len(samples[r[0]]))}
        self.sessions.apply(conversation, streams, rows[-1][0] if rows else None, seqs)
        return streams

    def latest_seqs(self, tenant: str | None = None) -> tuple[int, int]:
        """(the newest exchange seq, the newest feedback seq) (`tenant`'s); -1 where there is none."""
        own, args = self._of(tenant)
        ex = self._one(f"SELECT COALESCE(MAX(seq), -1) FROM exchanges WHERE {own}", args)[0]
        fb = self._one(f"SELECT COALESCE(MAX(seq), -1) FROM feedback WHERE {own}", args)[0]
        return ex, fb

    def conversations_since(
        self, upto: tuple[int, int], tenant: str | None = None, until: tuple[int, int] | None = None
    ) -> tuple[list[str], list[str]]:
        """(conversations with an exchange or feedback after `upto` (and up to `until`), the
        others begun by then), each in order of their first exchange; `tenant`'s only when given."""
        own, args = self._of(tenant)
        ex_to, fb_to = until if until is not None else (1 << 62, 1 << 62)
        rows = self._all(
            f"SELECT conversation FROM exchanges WHERE seq > ? AND seq <= ? AND {own} "
            f"UNION SELECT conversation FROM feedback WHERE seq > ? AND seq <= ? AND {own}",
            (upto[0], ex_to, *args, upto[1], fb_to, *args),
        )
        touched = {r[0] for r in rows}
        sql = f"SELECT conversation FROM exchanges WHERE {own} GROUP BY conversation HAVING MIN(seq) <= ? ORDER BY MIN(seq)"
        every = [r[0] for r in self._all(sql, (*args, ex_to))]
        return [c for c in every if c in touched], [c for c in every if c not in touched]

    def rewarded(self, upto: int, limit: int, tenant: str | None = None) -> list[tuple[int, int, float]]:
        """The newest `limit` (exchange seq, choice, reward) with a positive reward from feedback on
        exchanges up to `upto`: what the agent already answered well."""
        own, args = self._of(tenant)
        rows = self._all(
            f"SELECT exchange, choice, reward FROM feedback WHERE reward > 0 AND exchange <= ? AND {own} "
            "GROUP BY exchange, choice ORDER BY exchange DESC LIMIT ?",
            (upto, *args, limit),
        )
        return [(r[0], r[1], r[2]) for r in reversed(rows)]

    def usage_totals(self, after: int) -> tuple[int, int, int, int]:
        """(exchanges, prompt tokens, completion tokens, the newest seq) of exchanges after seq
        `after`: what the metrics add up incrementally."""
        row = self._one(
            "SELECT COUNT(*), COALESCE(SUM(json_extract(request, '$.usage.prompt_tokens')), 0), "
            "COALESCE(SUM(json_extract(request, '$.usage.completion_tokens')), 0), COALESCE(MAX(seq), ?) "
            "FROM exchanges WHERE seq > ?",
            (after, after),
        )
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _legacy_adapter_updates(db) -> list[tuple]:
    """The `adapter_updates` table of stores written before `versions`, as versions rows."""
    rows = db.execute(
        "SELECT id, kind, candidate, accepted, reason, gate, metrics, exchanges_upto, feedback_upto, current, "
        "current_version, created FROM adapter_updates ORDER BY id"
    ).fetchall()
    return [(*r[:7], json.dumps({"exchanges": r[7], "feedback": r[8]}, sort_keys=True), *r[9:]) for r in rows]
