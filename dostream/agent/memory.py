"""`dostream agent run --memory`: the continual agent with a memory (`dostream.memory`) beside its
weights. Knows nothing of updates or gates.

- **Retrieval**: every episode opens with the notes that best match its opening (the question, the
  customer's request) as one `context` segment before it (`memory.as_context`): conditioning only,
  masked in every view, recorded in the episode's stream exactly as the model saw it. Each note an
  acting episode saw counts `used` from that episode (`count_used`; evaluations do not count).
- **Distillation**: after each acting block the episodes recorded since the last distillation are
  distilled into the memory (`memory.distill`: extractive notes from the world's statements, each
  admitted by the world-model test on the adapter in force). The point reached is kept in
  `OUT/memory/agent-distilled.json`, so a killed run distils what it had not.
- **Tools** (environments that can run a learned procedure: the support worlds): episodes are
  offered the memory's verified tools (`memory.tools.Tooled`); after each acting block the
  successful episodes' procedures become candidate tools (`memory.tools.learn`), each verified by
  execution in fresh environments on fresh calls before it is ever offered (`memory.tools.verify`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dostream.files import atomic_write_text
from dostream.memory.retrieve import as_context, retrieve
from dostream.memory.store import Memory, Source

MARK = "agent-distilled.json"


class Remembering:
    """An environment whose episodes open with the notes its memory has for them."""

    def __init__(self, env, memory: Memory, k: int):
        self.env, self.memory, self.k = env, memory, k

    def __getattr__(self, name: str) -> Any:  # stop, turn_over, ...: the environment's own
        return getattr(self.env, name)

    def reset(self, item: Any):
        segments = list(self.env.reset(item))
        situation = " ".join(s.text for s in segments if s.author != "context") or " ".join(s.text for s in segments)
        notes = retrieve(self.memory, situation, self.k) if situation.strip() else []
        return [as_context(notes), *segments] if notes else segments

    def step(self, agent_text: str, token_ids: list[int] | None = None):
        return self.env.step(agent_text, token_ids)


def count_used(memory: Memory, streams) -> None:
    """Each note an episode opened with counts `used`, from that episode (`Source.of`)."""
    for s in streams:
        first = s.segments[0] if s.segments else None
        for nid in first.meta.get("memory_notes", []) if first is not None else []:
            memory.count(nid, "used", Source.of(s))


def learn_tools(memory: Memory, name: str, streams, procedure_of, make_env, items) -> dict[str, int]:
    """Candidate tools from `streams`' successful procedures, each candidate verified by execution
    in fresh environments (`make_env`, the bare environment) on `items`."""
    from dostream.memory.tools import learn, tool, verify

    found = learn(memory, name, streams, procedure_of)
    verified = refused = 0
    for tid in found:
        if tool(memory, tid).status == "candidate":
            t = verify(memory, tid, make_env, items)
            verified += t.status == "verified"
            refused += t.status == "refused"
    return {"tools": len(found), "verified": verified, "refused": refused}


def distill_since(
    memory: Memory, directory: Path, episodes, upto: int, model, tok, config=None
) -> dict[str, Any] | None:
    """Distil the episodes `[mark, upto)` (`episodes(start, stop)` reads them) into `memory`
    (`config`: a `memory.distill.DistillConfig`, None for its defaults); None when there is nothing
    new, else what it did (`streams`: the episodes it read)."""
    from dostream.memory.distill import distill
    from dostream.render import Renderer

    mark = directory / MARK
    start = json.loads(mark.read_text())["episodes"] if mark.exists() else 0
    if start >= upto:
        return None
    streams = episodes(start, upto)
    records = distill(streams, memory, model, Renderer(tok, add_eos=False), config)
    atomic_write_text(mark, json.dumps({"episodes": upto}) + "\n")
    return {
        "streams": streams,
        "episodes": upto - start,
        "candidates": len(records),
        "admitted": sum(r.get("note") is not None for r in records),
    }
