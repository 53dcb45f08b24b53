"""`dostream serve --memory DIR`: the served agent's memory (`dostream.memory`) in its prompts, and
its admin endpoints. Knows no HTTP (the routes call it) and no batcher.

- **Retrieval into context.** Before a request's prompt is rendered, the notes that best match the
  user's newest message (`memory.retrieve`, lexical) enter the stream as one `context` segment
  (`memory.as_context`) just before that message: never a training target, recorded with the
  exchange's new segments, so the exported stream holds exactly the notes the model saw and a
  later `dostream train` renders what it was conditioned on. Each retrieved note counts `used`.
- **Distillation** (`POST /v1/memory/distill`, admin): the conversations recorded since the last
  distillation are distilled into the memory (`memory.distill`: extractive notes, each admitted by
  the world-model test on the model in force) on the memory's own thread, one run at a time, never
  on a request's path; `--memory` without `--learn` distils too. The point it reached is kept in
  `DIR/serve-distilled.json`.
- **Inspection and forgetting**: `GET /v1/memory` (the active notes), `GET /v1/memory/{id}` (one
  note with its evidence and counters), `DELETE /v1/memory?stream=|user=|key=` (forget a source:
  every note and count from it, `Memory.forget`).
- **Rollback** (a tenant's snapshot rollback, `serve/tenants.py`): the memory put back to the
  snapshot's version (`memory.rollback`) on the connection retrieval reads, under its lock: the
  next prompt retrieves from the memory as it was (the bm25 index is rebuilt when the FTS index
  it is stamped with changes, `retrieve.Bm25`).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dostream.files import atomic_write_text
from dostream.memory.retrieve import as_context, retrieve
from dostream.memory.rollback import put_back
from dostream.memory.store import Memory, Source
from dostream.stream import Segment

MARK = "serve-distilled.json"  # the exchange seq distillation reached


class ServedMemory:
    """One memory directory, shared by the request threads (retrieval) and its distilling thread."""

    def __init__(self, directory: str | Path, k: int, slot, tok):
        self.dir, self.k, self.slot, self.tok = Path(directory), k, slot, tok
        self.memory = Memory.open_dir(self.dir, check_same_thread=False)
        self.lock = threading.Lock()  # one connection: one user at a time
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dostream-memory")
        self.retrieved = 0  # notes put into prompts (tests, metrics)

    def context(self, new: list[Segment], source: Source) -> list[Segment]:
        """`new` with the notes for its newest user message before that message (unchanged when
        there is none, or no note matches); each note counts `used` from `source` (the
        conversation, its user, the key: what forgetting that source removes)."""
        last = next((i for i in range(len(new) - 1, -1, -1) if new[i].author == "user"), None)
        if last is None or not new[last].text.strip():
            return new
        with self.lock:
            notes = retrieve(self.memory, new[last].text, self.k)
            for n in notes:
                self.memory.count(n.id, "used", source)
        if not notes:
            return new
        self.retrieved += len(notes)
        return [*new[:last], as_context(notes), *new[last:]]

    # -- admin ------------------------------------------------------------------------------
    def listing(self) -> dict[str, Any]:
        with self.lock:
            notes = self.memory.notes()
        return {"object": "list", "data": [n.to_json() for n in notes]}

    def show(self, note: int) -> dict[str, Any]:
        with self.lock:
            return self.memory.note(note).to_json()

    def forget(self, **source: str) -> dict[str, Any]:
        with self.lock:
            gone = self.memory.forget(**source)
        return {"object": "memory.forget", **source, "forgotten": gone}

    def roll_back(self, version: int, since: float | None = None, *, check: bool = False) -> dict[str, Any]:
        """Put the memory back to `version` (`memory.rollback.put_back`; `since`: the snapshot's
        time). `check`: only raise what it would raise (a bad version, a branched history)."""
        with self.lock:
            return put_back(self.memory, version, since=since, check=check)

    def distill(self, store) -> Future:
        """Distil the conversations recorded since the last run, on the memory's thread."""
        return self._pool.submit(self._distill, store)

    def _distill(self, store) -> dict[str, Any]:
        from dostream.memory.distill import distill
        from dostream.render import Renderer

        mark = self.dir / MARK
        start = json.loads(mark.read_text())["conversations"] if mark.exists() else 0
        conversations = store.conversations()
        streams = store.export_streams(start, len(conversations))  # to the point recorded below
        if not streams:
            return {"object": "memory.distill", "status": "nothing new", "conversations": 0}
        model = self.slot.get()[0]
        memory = Memory.open_dir(self.dir)  # its own connection: retrieval goes on meanwhile
        try:
            records = distill(streams, memory, model, Renderer(self.tok, chat_template=True))
        finally:
            memory.close()
        atomic_write_text(mark, json.dumps({"conversations": len(conversations)}))
        admitted = [r for r in records if r.get("note") is not None]
        return {
            "object": "memory.distill",
            "status": "done",
            "conversations": len(conversations) - start,
            "candidates": len(records),
            "admitted": len(admitted),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.memory.close()
