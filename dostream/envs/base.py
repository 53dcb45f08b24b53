"""The episode API every environment shares, and the recorder that turns an episode into a Stream.

An environment (`Environment`) is gym-like, one episode at a time, and declares everything the
acting loop (`envs/rollout.py`) reads from it:

    reset(item) -> list[Segment]                      the world's opening segments
    step(agent_text, token_ids=None) -> StepResult    the world's answer to one agent turn
    stop: tuple[str, ...]                             where sampling pauses (a line break, a ")")
    turn_over(text) -> bool                           whether the agent's turn so far is complete

The environment writes only world segments, each with its true author (`context`/`user` for the
question, `protocol` for scaffolding, `tool`, `verifier`, `oracle`, ...). The agent's turns are
recorded by `Episode`, which is the one place an `agent` segment is born: with the exact sampled
`token_ids` when the caller has them, so rendering never re-tokenises what the agent did.

>>> from dostream.envs.stem import StemEnv, generate
>>> problem = generate("test", 1, seed=0)[0]
>>> ep = Episode(StemEnv(), problem)
>>> world = ep.reset()
>>> result = ep.step("I don't know.", token_ids=[40, 1541])
>>> [s.author for s in ep.to_stream().segments]
['protocol', 'context', 'protocol', 'agent', 'verifier', 'protocol', 'oracle']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dostream.stream import Segment, Stream


@dataclass
class StepResult:
    """What the world did after one agent turn: its segments, the reward, whether the episode is over."""

    segments: list[Segment]
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """The shared episode API. Implementations keep one episode's state between calls.

    `stop` and `turn_over` are the environment's turn rule, all the acting loop needs to know
    about turns: sampling pauses after a `stop` string, and a turn is over as soon as `turn_over`
    holds for its text (its sampled ids are cut there). A turn that is not over goes on after a
    pause; one that ends without being over (EOS, or the token budget) is stepped as it stands.
    An environment ends every episode after a bounded number of turns.
    """

    stop: tuple[str, ...]

    def reset(self, item: Any) -> list[Segment]:
        """Start an episode on `item` (a problem, a dialogue seed, ...); return the opening segments."""
        ...

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        """Answer one agent turn; the environment never writes an `agent` segment itself."""
        ...

    def turn_over(self, text: str) -> bool:
        """Whether `text`, the agent's turn so far, is a complete turn (monotone: stays true as it grows)."""
        ...


def _item_id(item: Any) -> str | None:
    if isinstance(item, dict):
        return None if item.get("id") is None else str(item["id"])
    return None if getattr(item, "id", None) is None else str(item.id)


def _jsonable(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if v is None or isinstance(v, (str, int, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _jsonable(x) for k, x in v.items())


class Episode:
    """Record one interaction with an environment as a `Stream`.

    `reset()` records the opening world segments, each `step()` records the agent's turn (author
    `agent`, role `assistant`, its `token_ids` kept as given) and then the world's answer.
    `to_stream()` returns everything in order; the stream's meta holds the episode's total
    reward, the number of agent turns and the JSON-able `info` of the steps (later keys win).
    """

    def __init__(self, env: Environment, item: Any, *, id: str | None = None, meta: dict[str, Any] | None = None):
        self.env, self.item = env, item
        self.id = id if id is not None else (_item_id(item) or "episode")
        self.segments: list[Segment] = []
        self.meta: dict[str, Any] = dict(meta or {})
        self.reward = 0.0
        self.turns = 0
        self.done = False
        self._started = False

    def reset(self) -> list[Segment]:
        segments = list(self.env.reset(self.item))
        self._check_world(segments)
        self.segments, self.reward, self.turns, self.done, self._started = list(segments), 0.0, 0, False, True
        return segments

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError(f"episode {self.id!r} is over: no step after done")
        ids = None if token_ids is None else [int(t) for t in token_ids]
        self.segments.append(Segment("agent", agent_text, token_ids=ids, role="assistant"))
        result = self.env.step(agent_text, ids)
        self._check_world(result.segments)
        self.segments.extend(result.segments)
        self.reward += float(result.reward)
        self.turns += 1
        self.done = bool(result.done)
        self.meta.update({k: v for k, v in result.info.items() if _jsonable(v)})
        return result

    def to_stream(self) -> Stream:
        meta = {**self.meta, "reward": self.reward, "turns": self.turns, "done": self.done}
        return Stream(self.id, list(self.segments), meta)

    @staticmethod
    def _check_world(segments: list[Segment]) -> None:
        for s in segments:
            if s.author == "agent":
                raise ValueError("an environment wrote an 'agent' segment: only Episode records agent turns")
