"""What a session adds to the serve store between its exchanges: its committed user items not yet
answered, and how much of each answer reached the user. Knows no WebSocket and no model.

Two insert-only tables beside the exchanges, in the same SQLite file (`ServeStore.db`, its lock):

    session_items  a user item committed in a session (`input_text_buffer.commit`,
                   `conversation.item.create`), written the moment it is committed: its segments
                   (one `user` segment per chunk, with its arrival time) and the exchange it follows
                   (`after`, -1: none yet). The exchange that answers it records the same segments
                   as its own, so a committed item is in the store whether or not an answer came.
    deliveries     the client's word on how much of an answer it delivered (`conversation.item.truncate`):
                   the exchange, the tokens and characters heard; the newest one counts.

`apply(conversation, streams)` puts them into an exported conversation: the main stream gets the
items committed after its last exchange, and every answer's `meta.delivered_tokens` /
`delivered_chars` the newest delivery recorded for it.
"""

from __future__ import annotations

import json
import time

from dostream.sqlite import transaction
from dostream.stream import Segment, Stream, stored_segments

SCHEMA = """
CREATE TABLE IF NOT EXISTS session_items (
    seq INTEGER PRIMARY KEY,
    conversation TEXT NOT NULL,
    after INTEGER NOT NULL,
    segments TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS session_items_by_conversation ON session_items (conversation, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY,
    exchange INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    chars INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


class SessionLog:
    """The session tables of one `ServeStore` (created when the store is opened to write)."""

    def __init__(self, store):
        self.store = store

    def add_item(self, conversation: str, after: int | None, segments: list[Segment]) -> None:
        body = json.dumps([s.to_json() for s in segments], ensure_ascii=False)
        with self.store.lock:
            transaction(
                self.store.db,
                [
                    (
                        "INSERT INTO session_items (conversation, after, segments, created) VALUES (?, ?, ?, ?)",
                        (conversation, -1 if after is None else after, body, time.time()),
                    )
                ],
            )

    def add_delivery(self, exchange: int, tokens: int, chars: int) -> None:
        with self.store.lock:
            transaction(
                self.store.db,
                [
                    (
                        "INSERT INTO deliveries (exchange, tokens, chars, created) VALUES (?, ?, ?, ?)",
                        (exchange, tokens, chars, time.time()),
                    )
                ],
            )

    def apply(self, conversation: str, streams: list[Stream], last: int | None, seqs: dict[int, int]) -> None:
        """Into `streams` (the conversation's, the main one first): the items committed after its
        last exchange `last` (None: no exchange), and each answer's newest delivery (`seqs`: the
        exchange seq of each sample segment, by `id()` of the segment)."""
        if not self._tables():
            return
        rows = self.store._all(
            "SELECT after, segments FROM session_items WHERE conversation = ? ORDER BY seq", (conversation,)
        )
        tail = [r[1] for r in rows if r[0] == (-1 if last is None else last)]
        if tail:
            if not streams:
                streams.append(Stream(conversation, [], {"source": "serve", "conversation": conversation}))
            for body in tail:
                streams[0].segments += stored_segments(body, f"{self.store.path} (session_items)")
        delivered = dict(
            (r[0], (r[1], r[2])) for r in self.store._all("SELECT exchange, tokens, chars FROM deliveries ORDER BY seq")
        )
        for stream in streams:
            for seg in stream.segments:
                seq = seqs.get(id(seg))
                if seq in delivered:
                    seg.meta = {**seg.meta, "delivered_tokens": delivered[seq][0], "delivered_chars": delivered[seq][1]}

    def _tables(self) -> bool:
        return self.store._one("SELECT name FROM sqlite_master WHERE name = 'session_items'") is not None
