"""Tools as memory: a procedure that worked, admitted as a callable tool only once execution verifies it.

A learned tool is a memory entry of its own kind: a note of kind `tool` (its evidence, situation,
counters and forgetting are a note's, `store.py`) and a row of the memory file's `tools` table
(its name, the environment it works in, its procedure, its status and verification record).

* **Learned** (`learn`) from episodes that succeeded. The environment says what procedure an
  episode shows (`procedure_of(stream)`, e.g. `envs.support.procedure_of`): the agent's action is
  the tool's procedure and its *situation*; the world's words that said it worked (the service's
  "checks out", a verifier's verdict) are its *evidence*, world-authored spans only, as for any
  note. The same procedure in several episodes is one tool with several evidence spans.
* **Candidate until verified** (`verify`): the procedure is executed by the environment itself
  (`env.run_tool(procedure)`) in fresh episodes of the same kind on items it applies to
  (`env.tool_applies(procedure, item)`); the outcomes it produced (did the world say success, and
  its words) are its verification record. Every run must succeed (`min_rate`): `verified`,
  else `refused`. Nothing is callable before: `Tooled` offers only verified tools of an active note.
* **Offered and called** (`Tooled`): an environment wrapper whose episodes open with the verified
  tools that apply as the tool list (one `context` segment with `meta.tools`, the tools preamble
  of `toolcalls.py`, `meta.memory_tools` naming the tool ids). When the agent's turn calls one
  (`<tool_call>{"name": ..., "arguments": {}}</tool_call>`, `toolcalls.parse_calls`), the
  environment runs its procedure: what the tool says or computes comes back `tool`-authored, the
  world's answer with its own author, so both are evidence, supervised like any tool's output,
  while the agent's call stays an intervention, masked. A call to a name not offered (a candidate,
  a refused tool) is not executed: the turn goes to the environment as the text it is.

An environment that learns tools implements `ToolEnv` (`run_tool`, `tool_applies`) beside the
episode API, and a `procedure_of` function over its streams.

>>> from dostream.envs.base import Episode
>>> from dostream.envs.support import SupportEnv, SupportWorld, procedure_of
>>> world, mem = SupportWorld(0), Memory(":memory:")
>>> ep = Episode(SupportEnv(world), world.tasks("train", 1, seed=0)[0])  # Summit Health: the date of birth
>>> _ = ep.reset(), ep.step(" date of birth 1971-09-17.\\n")
>>> [tid] = learn(mem, "support:0", [ep.to_stream()], procedure_of)
>>> tool(mem, tid).name, tool(mem, tid).status, tool(mem, tid).callable
('call_summit_health', 'candidate', False)
>>> verify(mem, tid, lambda: SupportEnv(world), world.tasks("train", 100, seed=1)).callable
True
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dostream.envs.base import StepResult, _item_id
from dostream.memory.store import Cite, Link, Memory, Source
from dostream.stream import Segment, Stream
from dostream.toolcalls import CALL_CLOSE, CALL_OPEN, parse_calls, tools_preamble

STATUSES = ("candidate", "verified", "refused")


class ToolEnv(Protocol):
    """What an environment adds to the episode API (`envs.base.Environment`) to learn tools."""

    def tool_applies(self, procedure: dict[str, Any], item: Any) -> bool:
        """Whether the procedure can be made on this item's episode (offered, verified there)."""
        ...

    def run_tool(self, procedure: dict[str, Any]) -> StepResult:
        """Make the procedure in the current episode: its own output as `tool` segments, then the
        world's answer, the step's reward, done and info (with the success key)."""
        ...


@dataclass
class Tool:
    """A learned tool: its note (`id`, `note_status`, evidence, situation, counters) and its row."""

    id: int
    name: str
    env: str
    procedure: dict[str, Any]
    status: str  # candidate | verified | refused
    description: str
    verification: dict[str, Any] | None
    note_status: str  # the note's: active | superseded | forgotten
    evidence: list[Link] = field(default_factory=list)
    situation: list[Link] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def callable(self) -> bool:
        """Verified by execution, and its note still in force."""
        return self.status == "verified" and self.note_status == "active"

    def definition(self) -> dict[str, Any]:
        """The tool as the agent sees it (OpenAI's function shape, no arguments: the environment
        fills the procedure's slots from the episode)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {"type": "object", "properties": {}},
            },
        }


def tool(memory: Memory, tool_id: int) -> Tool:
    """One learned tool, whatever its status."""
    row = memory.db.execute(
        "SELECT name, env, procedure, status, verification FROM tools WHERE note = ?", (int(tool_id),)
    ).fetchone()
    if row is None:
        raise KeyError(f"{memory.path}: no tool {tool_id}")
    note = memory.note(tool_id)
    name, env, procedure, status, verification = row
    return Tool(
        note.id,
        name,
        env,
        json.loads(procedure),
        status,
        note.text,
        json.loads(verification) if verification else None,
        note.status,
        note.evidence,
        note.situation,
        note.counters,
    )


def tools(memory: Memory, env: str | None = None, status: str | None = None) -> list[Tool]:
    """The learned tools (of environment `env`, with `status`), oldest first."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"tool status is one of {', '.join(STATUSES)}, not {status!r}")
    if memory.read_only and memory.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tools'").fetchone() is None:
        return []  # a memory file from before tools
    where = [(c, v) for c, v in (("env", env), ("status", status)) if v is not None]
    sql = "SELECT note FROM tools" + (" WHERE " + " AND ".join(f"{c} = ?" for c, _ in where) if where else "")
    return [tool(memory, n) for (n,) in memory.db.execute(sql + " ORDER BY note", tuple(v for _, v in where))]


def propose(
    memory: Memory,
    env: str,
    name: str,
    procedure: dict[str, Any],
    description: str,
    *,
    evidence: Sequence[Cite],
    situation: Sequence[Cite] = (),
) -> int:
    """A new `candidate` tool (not callable): a note of kind `tool` with its evidence (world-authored
    spans only, `store.EvidenceError` otherwise) and its row, in one transaction. A name another tool of `env` holds
    gets a suffix (`_2`, ...). Returns its id."""
    taken = {n for (n,) in memory.db.execute("SELECT name FROM tools WHERE env = ?", (env,))}
    base, k = name, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    row = "INSERT INTO tools VALUES (?, ?, ?, ?, 'candidate', NULL, ?)"
    return memory.add(
        description,
        "tool",
        evidence=evidence,
        situation=situation,
        meta={"tool": name, "env": env},
        also=lambda nid: [(row, (nid, name, env, _procedure_key(procedure), time.time()))],
    )


def learn(
    memory: Memory, env: str, streams: Iterable[Stream], procedure_of: Callable[[Stream], dict | None]
) -> list[int]:
    """Candidates from the episodes that show a procedure that worked (`procedure_of`), one tool per
    distinct procedure: a new one is proposed (the first episode's spans `written_from`, so
    forgetting that episode forgets the tool), a known one (any status) cites the new evidence.
    Returns the ids of the tools proposed or cited, in order of first appearance."""
    out: list[int] = []
    for s in streams:
        shown = procedure_of(s)
        if shown is None:
            continue
        key = _procedure_key(shown["procedure"])
        row = memory.db.execute(
            "SELECT t.note FROM tools t JOIN notes n ON n.id = t.note "
            "WHERE t.env = ? AND t.procedure = ? AND n.status = 'active'",
            (env, key),
        ).fetchone()
        if row is None:
            tid = propose(
                memory,
                env,
                shown["name"],
                shown["procedure"],
                shown["description"],
                evidence=[Cite(s, i) for i in shown["evidence"]],
                situation=[Cite(s, i) for i in shown.get("situation", [])],
            )
        else:
            tid = row[0]
            memory.cite(tid, [Cite(s, i, written_from=False) for i in shown["evidence"]])
        if tid not in out:
            out.append(tid)
    return out


def verify(
    memory: Memory,
    tool_id: int,
    make_env: Callable[[], Any],
    items: Iterable[Any],
    *,
    runs: int = 3,
    min_rate: float = 1.0,
    success: str = "success",
) -> Tool:
    """Execute a candidate's procedure in fresh environments (`make_env()`), on the first `runs` of
    `items` it applies to, and record what it produced: each run's item, whether the world said it
    succeeded (`info[success]`), the reward and the world's words. `verified` when there were
    `runs` runs and at least `min_rate` of them succeeded, else `refused`. Returns the tool."""
    t = tool(memory, tool_id)
    if t.status != "candidate" or t.note_status != "active":
        raise ValueError(
            f"tool {tool_id} ({t.name}) is {t.status}, note {t.note_status}: only an active candidate is verified"
        )
    outcomes = []
    for item in items:
        if len(outcomes) == runs:
            break
        env = make_env()
        if not env.tool_applies(t.procedure, item):
            continue
        env.reset(item)
        result = env.run_tool(t.procedure)
        outcomes.append(
            {
                "item": _item_id(item),
                "success": bool(result.info.get(success)),
                "reward": float(result.reward),
                "tool": "".join(s.text for s in result.segments if s.author == "tool"),
                "world": "".join(s.text for s in result.segments if s.author not in ("tool", "protocol")),
            }
        )
    passed = sum(o["success"] for o in outcomes)
    ok = len(outcomes) >= runs and passed >= min_rate * len(outcomes)
    record = {"runs": outcomes, "needed": runs, "min_rate": min_rate, "passed": passed, "at": time.time()}
    memory._tx(
        [
            (
                "UPDATE tools SET status = ?, verification = ?, changed = ? WHERE note = ?",
                ("verified" if ok else "refused", json.dumps(record, ensure_ascii=False), time.time(), t.id),
            )
        ]
    )
    return tool(memory, tool_id)


def as_tool_list(offered: Sequence[Tool]) -> Segment:
    """Verified tools as ONE `context` segment, the tool list (`meta.tools`, the tools preamble),
    `meta.memory_tools` naming their ids: conditioning only, masked in every view."""
    if not offered:
        raise ValueError("no tools to offer")
    defs = [t.definition() for t in offered]
    return Segment(
        "context", tools_preamble(defs) + "\n", meta={"tools": defs, "memory_tools": [t.id for t in offered]}
    )


class Tooled:
    """An environment whose episodes are offered the memory's verified tools for `env` (the name
    they were learned under) that apply to the item, and which runs them when the agent calls one.

    A turn that opens a `<tool_call>` is over when the block closes (sampling also pauses there);
    otherwise the environment's own turn rule holds."""

    def __init__(self, env, memory: Memory, name: str):
        self.env, self.memory, self.name = env, memory, name
        self.stop = (*env.stop, CALL_CLOSE)
        self.offered: dict[str, Tool] = {}

    def __getattr__(self, attr: str) -> Any:  # the environment's own (task, world, ...)
        return getattr(self.env, attr)

    def reset(self, item: Any) -> list[Segment]:
        segments = list(self.env.reset(item))
        found = [
            t
            for t in tools(self.memory, self.name, "verified")
            if t.callable and self.env.tool_applies(t.procedure, item)
        ]
        self.offered = {t.name: t for t in found}
        return [as_tool_list(found), *segments] if found else segments

    def turn_over(self, text: str) -> bool:
        at = text.find(CALL_OPEN)
        if at < 0:
            return self.env.turn_over(text)
        return self.env.turn_over(text[:at]) or CALL_CLOSE in text[at:]

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        _, calls = parse_calls(agent_text)
        called = next(
            (self.offered[c["function"]["name"]] for c in calls if c["function"]["name"] in self.offered), None
        )
        if called is None:  # no call, or a call to what is not offered: the turn as the text it is
            return self.env.step(agent_text, token_ids)
        result = self.env.run_tool(called.procedure)
        result.info = {**result.info, "memory_tool": called.id, "tool_name": called.name}
        return result


def count_calls(memory: Memory, streams: Iterable[Stream], success: str = "success") -> None:
    """Each episode that called a learned tool counts `used` on it, and `helped` when it succeeded,
    from that episode (`Source.of`: forgetting the episode removes the counts)."""
    for s in streams:
        tid = s.meta.get("memory_tool")
        if tid is None:
            continue
        memory.count(tid, "used", Source.of(s))
        if s.meta.get(success):
            memory.count(tid, "helped", Source.of(s))


def _procedure_key(procedure: dict[str, Any]) -> str:
    return json.dumps(procedure, sort_keys=True, ensure_ascii=False)
