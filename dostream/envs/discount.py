"""A discount rule in the seed's three-case shape: veterans qualify, physicians qualify, others do not.

The rule is never stated. One question per episode: a customer says who they are and asks whether
they qualify; the Agent answers on one line; the customer (the world) states the *case* only:
"Yes, veterans qualify for the discount." or "No, nurses do not qualify for the discount." Three
such cases are useless as raw context until the rule "only veterans and physicians qualify" is
drawn from them: the held-out customers are people the training ones never were (other
occupations, and veterans and physicians described in other words), so answering them needs the
rule, not a case.

Success: the answer's first word is the right Yes or No.

>>> env = DiscountEnv()
>>> [s.author for s in env.reset(Customer("a nurse", "nurses", False))]
['context', 'protocol', 'user', 'protocol']
>>> env.step("Yes.\\n").segments[-1].text
'No, nurses do not qualify for the discount.\\n'
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dostream.stream import Segment

CONTEXT = "A customer asks whether they qualify for the store's discount. The Agent answers Yes or No.\n\n"


@dataclass(frozen=True)
class Customer:
    """Who asks: `who` as they say it ("a nurse"), the group the world names ("nurses"), the truth."""

    who: str
    group: str
    qualifies: bool


# Training customers: the three cases' shape, every occupation seen while acting.
TRAIN = (
    Customer("a veteran", "veterans", True),
    Customer("a physician", "physicians", True),
    Customer("a nurse", "nurses", False),
    Customer("a teacher", "teachers", False),
    Customer("a student", "students", False),
    Customer("a firefighter", "firefighters", False),
)
# Held-out customers: never seen while acting; only the rule decides them.
HELDOUT = (
    Customer("a retired army veteran", "veterans", True),
    Customer("a navy veteran", "veterans", True),
    Customer("a family physician", "physicians", True),
    Customer("a hospital physician", "physicians", True),
    Customer("a farmer", "farmers", False),
    Customer("a pilot", "pilots", False),
    Customer("a lawyer", "lawyers", False),
    Customer("an engineer", "engineers", False),
)


def items(split: str, n: int, seed: int) -> list[Customer]:
    """`n` customers of a split (train | heldout | control), drawn with `seed`. Half of each
    split's draws qualify, so always answering one word succeeds half the time."""
    pool = TRAIN if split == "train" else HELDOUT
    rng = random.Random(f"discount-items:{split}:{seed}")
    yes, no = [c for c in pool if c.qualifies], [c for c in pool if not c.qualifies]
    return [rng.choice(yes if rng.random() < 0.5 else no) for _ in range(n)]


def verdict(text: str) -> bool | None:
    """The answer's Yes (True) or No (False), from its first word; None if it says neither."""
    m = re.match(r"\W*(yes|no)\b", text.strip().lower())
    return None if m is None else m.group(1) == "yes"


class DiscountEnv:
    """One question, one answer, the world's case (see the module docstring)."""

    stop = ("\n",)

    def __init__(self) -> None:
        self.customer: Customer | None = None

    def turn_over(self, text: str) -> bool:
        return "\n" in text

    def reset(self, item: Customer) -> list[Segment]:
        self.customer = item
        return [
            Segment("context", CONTEXT),
            Segment("protocol", "User: "),
            Segment("user", f"I am {item.who}. Do I qualify for the discount?\n"),
            Segment("protocol", "Agent: "),
        ]

    def step(self, agent_text: str, token_ids: list[int] | None = None):
        from dostream.envs.base import StepResult

        if self.customer is None:
            raise RuntimeError("reset() first")
        c = self.customer
        ok = verdict(agent_text) == c.qualifies
        case = f"Yes, {c.group} qualify" if c.qualifies else f"No, {c.group} do not qualify"
        lead = [] if agent_text.endswith("\n") else [Segment("protocol", "\n")]
        segments = lead + [Segment("protocol", "User: "), Segment("user", f"{case} for the discount.\n")]
        return StepResult(segments, reward=float(ok), done=True, info={"success": ok, "group": c.group})
