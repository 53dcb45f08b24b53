"""Customer-support calls: an environment where the world's answer carries the knowledge.

The agent phones a service on the user's behalf (the scenario of the dual-LoRA seed article,
docs/reference.md §3). Every service verifies the caller with one
piece of the user's details, and which piece is a rule of that service, drawn from a seed: one
bank wants the account number, an airline the booking reference. The agent says which piece it
has ready; with the right one the request goes through, otherwise the service refuses and says
what it needs. The reward says only "failed"; the service's reply says why. A later call to the
same service succeeds only if the agent prepares what it was told.

One episode, every piece with its author:

    context      You phone customer services for the user. User details: card ending 4821; ...
                 Task: cancel the plan with Northwind Internet.
    protocol     Agent: Calling Northwind Internet. I have ready the user's
    agent        card ending 4821.
    protocol     (newline) Northwind Internet:
    environment  I can't help without the date of birth. Please have the date of birth ready when you call us.

Held-out combinations: each service keeps one of its goals out of the training tasks, so the
held-out split asks for requests the agent never made, to services whose rule it may have learned.

>>> world = SupportWorld(seed=0)
>>> task = world.tasks("train", 1, seed=0)[0]
>>> env = SupportEnv(world)
>>> [s.author for s in env.reset(task)]
['context', 'protocol']
>>> env.step(" " + ITEMS[task.required].phrase.format(task.details[task.required]) + ".\\n").info["success"]
True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from dostream.envs.base import StepResult
from dostream.stream import Segment, Stream

CONTEXT = "You phone customer services for the user."


@dataclass(frozen=True)
class Item:
    """One piece of the user's details: how it is written, how it is recognised, how a value is drawn."""

    name: str  # "the date of birth": how a service asks for it
    phrase: str  # "date of birth {}": how the details list it (and how an agent may name it)
    pattern: str  # a regex that recognises the agent naming it

    @property
    def words(self) -> str:
        """The phrase without its value: how the agent's own turn names it ("security PIN")."""
        return self.phrase.format("").strip()


ITEMS: dict[str, Item] = {
    "card": Item("the last four digits of the card", "card ending {}", r"\bcard\b|last four|\bdigits\b"),
    "account": Item("the account number", "account number {}", r"\baccount\b"),
    "birth": Item("the date of birth", "date of birth {}", r"\bbirth|\bborn\b|\bbirthday\b|\bDOB\b"),
    "zip": Item("the billing ZIP code", "billing ZIP code {}", r"\bzip\b|\bpostal\b|\bpostcode\b"),
    "pin": Item("the security PIN", "security PIN {}", r"\bpin\b|security code"),
    "booking": Item("the booking reference", "booking reference {}", r"\bbooking\b|\breservation\b|\breference\b"),
}
SERVICES = (
    "Northwind Internet",
    "Bluebird Bank",
    "Skyway Airlines",
    "Evergreen Energy",
    "Atlas Mobile",
    "Harbor Insurance",
    "Pinecrest Water",
    "Summit Health",
)
GOALS = (
    "cancel the plan",
    "dispute a charge on the last bill",
    "update the mailing address",
    "ask why the bill went up",
    "report a problem with the service",
    "change the payment date",
)
SPLITS = ("train", "heldout")


def _value(kind: str, rng: random.Random) -> str:
    if kind == "card":
        return f"{rng.randrange(10_000):04d}"
    if kind == "account":
        return f"{rng.randrange(1000, 10_000)}-{rng.randrange(10_000):04d}"
    if kind == "birth":
        return f"{rng.randrange(1950, 2004)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == "zip":
        return f"{rng.randrange(10_000, 100_000)}"
    if kind == "pin":
        return f"{rng.randrange(10_000):04d}"
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6))


def named_item(text: str) -> str | None:
    """The first piece of details the agent's turn names (the one it brings), or None.

    >>> named_item(" date of birth 1990-03-14, and the card ending 4821.")
    'birth'
    >>> named_item(" nothing at all.") is None
    True
    """
    turn = text.split("\n", 1)[0]
    hits = [
        (m.start(), kind)
        for kind, it in ITEMS.items()
        if (m := re.search(it.pattern, turn, flags=re.IGNORECASE)) is not None
    ]
    return min(hits)[1] if hits else None


@dataclass(frozen=True)
class SupportTask:
    """One call to make: the service, the request, the user's details and (hidden) what it needs."""

    id: str
    service: str
    goal: str
    details: dict[str, str]
    required: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.service,
            "goal": self.goal,
            "details": dict(self.details),
            "required": self.required,
        }


class SupportWorld:
    """The services' rules, drawn from `seed`: what each service requires, and which of its goals
    is held out. Two worlds with the same seed are the same world."""

    def __init__(self, seed: int = 0, n_services: int = len(SERVICES)):
        if not (1 <= n_services <= len(SERVICES)):
            raise ValueError(f"n_services must be in 1..{len(SERVICES)}")
        rng = random.Random(f"support-world:{seed}")
        self.services = SERVICES[:n_services]
        kinds = list(ITEMS)
        rng.shuffle(kinds)
        # Every kind is needed by some service before any kind repeats.
        self.requires = {s: kinds[i % len(kinds)] for i, s in enumerate(self.services)}
        self.held_out = {s: rng.choice(GOALS) for s in self.services}

    def combos(self, split: str) -> list[tuple[str, str]]:
        """(service, goal) pairs of a split: `heldout` has one goal per service, `train` the rest."""
        if split not in SPLITS:
            raise ValueError(f"split is one of {SPLITS}, not {split!r}")
        return [(s, g) for s in self.services for g in GOALS if (self.held_out[s] == g) == (split == "heldout")]

    def tasks(self, split: str, n: int, seed: int) -> list[SupportTask]:
        """`n` tasks from a split's combinations, each with freshly drawn user details. A pure
        function of (world, split, n, seed); the first k tasks do not depend on n."""
        combos = self.combos(split)
        out = []
        for i in range(n):
            rng = random.Random(f"support-task:{split}:{seed}:{i}")
            service, goal = rng.choice(combos)
            kinds = list(ITEMS)
            rng.shuffle(kinds)  # the order of the details says nothing about what is needed
            details = {kind: _value(kind, rng) for kind in kinds}
            out.append(SupportTask(f"support-{split}-s{seed}-{i:05d}", service, goal, details, self.requires[service]))
        return out

    def rules(self) -> dict[str, str]:
        """Service -> what it requires, in words (for reports)."""
        return {s: ITEMS[k].name for s, k in self.requires.items()}


def prompt_segments(task: SupportTask) -> list[Segment]:
    details = "; ".join(ITEMS[k].phrase.format(v) for k, v in task.details.items())
    return [
        Segment("context", f"{CONTEXT} User details: {details}.\nTask: {task.goal} with {task.service}.\n"),
        Segment("protocol", f"Agent: Calling {task.service}. I have ready the user's"),
    ]


REPLIES = ("refusal", "framed")
FRAMED = "I can't help with that. Next time, have ready the user's"  # + " security PIN."


class SupportEnv:
    """One call per episode: the agent names what it has ready (one line), the service answers.

    `reply="refusal"` (the default) refuses in the service's words: "I can't help without the
    security PIN. Please have the security PIN ready when you call us." `reply="framed"` says the
    same in the words the agent's own turn begins with: "I can't help with that. Next time, have
    ready the user's security PIN." (a test of whether a small model uses a rule it has learned
    only when the rule is stated in the frame where it acts)."""

    stop = ("\n",)  # the agent's turn is one line

    def __init__(self, world: SupportWorld, reply: str = "refusal"):
        if reply not in REPLIES:
            raise ValueError(f"reply is one of {REPLIES}, not {reply!r}")
        self.world, self.reply = world, reply
        self.task: SupportTask | None = None

    def turn_over(self, text: str) -> bool:
        return "\n" in text

    def reset(self, item: SupportTask) -> list[Segment]:
        self.task = item
        return prompt_segments(item)

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        task = self.task
        if task is None:
            raise RuntimeError("reset() first")
        named = named_item(agent_text)
        need = ITEMS[task.required].name
        success = named == task.required
        if success:
            reply = f"Thank you, {need} checks out. Your request is done."
        elif self.reply == "framed":
            reply = f"{FRAMED} {ITEMS[task.required].words}."
        else:
            reply = f"I can't help without {need}. Please have {need} ready when you call us."
        lead = "" if agent_text.endswith("\n") else "\n"
        segments = [Segment("protocol", f"{lead}{task.service}: "), Segment("environment", reply + "\n")]
        info = {
            "success": success,
            "named": named,
            "required": task.required,
            "service": task.service,
            "goal": task.goal,
        }
        return StepResult(segments, reward=float(success), done=True, info=info)

    # -- learned tools (`memory/tools.py`): a procedure that worked, made again by the environment --
    def tool_applies(self, procedure: dict[str, Any], item: SupportTask) -> bool:
        """A learned tool calls one service: it is offered, and verified, on calls to that service."""
        return procedure.get("service") == item.service

    def run_tool(self, procedure: dict[str, Any]) -> StepResult:
        """Make the call the procedure holds: its line, the user's details in its slots, said to the
        service as the tool's own `tool` segment; the service answers it as it answers anyone."""
        task = self.task
        if task is None:
            raise RuntimeError("reset() first")
        try:
            line = procedure["line"].format_map(task.details)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"procedure line {procedure.get('line')!r} cannot be filled from the details: {e}"
            ) from None
        result = self.step(line)
        return StepResult(
            [Segment("tool", line, role="tool"), *result.segments], result.reward, result.done, result.info
        )


_SUCCESS = re.compile(r"Thank you, (.+) checks out\. Your request is done\.\n?")
_CALLING = re.compile(r"Calling (.+?)\. I have ready the user's")


def procedure_of(stream: Stream) -> dict[str, Any] | None:
    """The procedure a successful call shows, read from the world's words: the service's answer to
    the agent's line said it went through. `{"name", "procedure": {"service", "line"}, "description",
    "evidence": [the answer's segment], "situation": [the agent's line's segment]}`, or None. The
    line is the agent's own (its first line), the user's values in it replaced by slots
    (`{pin}`); a turn that called a tool is not a new procedure.

    >>> from dostream.envs.base import Episode
    >>> ep = Episode(SupportEnv(SupportWorld(0)), SupportWorld(0).tasks("train", 1, seed=0)[0])
    >>> _ = ep.reset(), ep.step(" the date of birth 1971-09-17, I think.\\n")
    >>> shown = procedure_of(ep.to_stream())
    >>> shown["name"], shown["procedure"]
    ('call_summit_health', {'service': 'Summit Health', 'line': ' the date of birth {birth}, I think.'})
    """
    segs = stream.segments
    turns = [i for i, s in enumerate(segs) if s.author == "agent"]
    if not turns or turns[-1] + 2 >= len(segs):
        return None
    a = turns[-1]
    answer, opening = segs[a + 2], segs[a - 1] if a > 0 else None
    calling = _CALLING.search(opening.text) if opening is not None and opening.author == "protocol" else None
    if (
        segs[a + 1].author != "protocol"
        or answer.author != "environment"
        or not _SUCCESS.fullmatch(answer.text)
        or calling is None
        or "<tool_call>" in segs[a].text
    ):
        return None
    details = {}
    for s in segs[:a]:
        if s.author == "context" and "User details: " in s.text:
            for kind, it in ITEMS.items():
                m = re.search(re.escape(it.phrase).replace(r"\{\}", r"([^;.\n]+)"), s.text)
                if m:
                    details[kind] = m.group(1)
    line = segs[a].text.split("\n", 1)[0].replace("{", "{{").replace("}", "}}")
    values = sorted(((v, k) for k, v in details.items() if v), key=lambda x: -len(x[0]))
    if values:
        slots = dict(values)
        line = re.sub("|".join(re.escape(v) for v, _ in values), lambda m: "{" + slots[m.group()] + "}", line)
    service = calling.group(1)
    return {
        "name": "call_" + re.sub(r"\W+", "_", service.lower()).strip("_"),
        "procedure": {"service": service, "line": line},
        "description": f"Call {service} and say what got a request through before: {line.strip()!r}, "
        "filled in from the user's details.",
        "evidence": [a + 2],
        "situation": [a],
    }
