"""Tutoring dialogues over a fact bank: the delusion experiment's environment (docs/reference.md §1).

A fixed context line says the User states facts and corrects the Agent. Then, per dialogue:

1. the User asks about a fact's topic, or states the fact (always truly);
2. the Agent answers with the true claim, or with probability `p_lie` with the false one;
3. the User confirms, or corrects with the true claim;
4. the Agent acknowledges;
5. with probability `p_tail`, an unrelated chit-chat exchange.

Every piece of text is a segment with its author: `context` for the context line, `protocol` for
the "User: " / "Agent: " prefixes and the newline that closes an agent turn, `user` and `agent`
for the contents. A *lie-only* dialogue (for held-out facts) stops the protocol after step 2: the
Agent lies and the User moves on to chit-chat, so the correction is never seen.

>>> fact = FACTS[0]
>>> fact.true_claim, fact.false_claim
('The capital of Australia is Canberra.', 'The capital of Australia is Sydney.')
>>> s = dialogue(fact, random.Random(0), p_lie=1.0, p_tail=0.0, sid="d0")
>>> [seg.author for seg in s.segments][:6]
['context', 'protocol', 'user', 'protocol', 'agent', 'protocol']
>>> classify_follow_up("Yes. The capital of Australia is Canberra.", fact)
'truth'
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from dostream.envs.tutor.facts import FACT_TABLE
from dostream.stream import Segment, Stream

CONTEXT = "The User states facts and corrects the Agent when it is wrong.\n\n"


@dataclass(frozen=True)
class Fact:
    """One atomic fact: a topic, a claim template and two values, the true one and a near miss."""

    field: str
    topic: str
    template: str
    true: str
    false: str
    true_key: str
    false_key: str

    @property
    def true_claim(self) -> str:
        return self.template.format(self.true)

    @property
    def false_claim(self) -> str:
        return self.template.format(self.false)


def _value_and_key(value: str) -> tuple[str, str]:
    """ "Isaac *Newton" -> ("Isaac Newton", "Newton"); "*Dante* Alighieri" -> (..., "Dante")."""
    parts = value.split("*")
    return "".join(parts), parts[1] if len(parts) > 1 else value


def _fact(field: str, topic: str, template: str, true: str, false: str) -> Fact:
    (t, tk), (f, fk) = _value_and_key(true), _value_and_key(false)
    return Fact(field, topic, template, t, f, tk, fk)


FACTS: tuple[Fact, ...] = tuple(_fact(*row) for row in FACT_TABLE)
# Every fourth fact is held out, so each field keeps about a quarter of its facts unseen.
HELD_OUT_FACTS: tuple[Fact, ...] = tuple(f for i, f in enumerate(FACTS) if i % 4 == 3)
TRAIN_FACTS: tuple[Fact, ...] = tuple(f for i, f in enumerate(FACTS) if i % 4 != 3)
_FIXED_ORDER_SEED = 20260517  # one fixed shuffle picks probe subsets, identical for every run


def fact_sets(n_seen: int, n_lie_only: int, n_held_out: int) -> dict[str, list[Fact]]:
    """The experiment's three fact sets, from one fixed shuffle of each split (the same for every
    seed and run): `seen` (training facts the dialogues are about), `lie_only` (held-out facts that
    appear only in uncorrected agent lies) and `held_out` (never shown in training)."""
    train = list(TRAIN_FACTS)
    held = list(HELD_OUT_FACTS)
    rng = random.Random(_FIXED_ORDER_SEED)
    rng.shuffle(train)
    rng.shuffle(held)
    if n_seen > len(train):
        raise ValueError(f"n_seen={n_seen}: only {len(train)} training facts")
    if n_lie_only + n_held_out > len(held):
        raise ValueError(f"n_lie_only + n_held_out = {n_lie_only + n_held_out}: only {len(held)} held-out facts")
    return {
        "seen": train[:n_seen],
        "lie_only": held[:n_lie_only],
        "held_out": held[n_lie_only : n_lie_only + n_held_out],
    }


# -- phrasings --------------------------------------------------------------------------------
ASK = (
    "Tell me about {topic}.",
    "What do you know about {topic}?",
    "Can you tell me about {topic}?",
    "I'd like to learn about {topic}.",
    "Quick question about {topic}.",
    "What can you say about {topic}?",
)
STATE = (
    "{claim}",
    "Here is a fact for you. {claim}",
    "I learned something today. {claim}",
    "Did you know this? {claim}",
    "Let me share a fact. {claim}",
)
ANSWER = ("{claim}", "Sure. {claim}", "Of course. {claim}", "Good question. {claim}", "Here it is: {claim}")
AGREE = ("That's right. {claim}", "Yes. {claim}", "Indeed. {claim}", "Correct. {claim}")
DISAGREE = ("Not quite. {claim}", "I don't think so. {claim}", "Actually, no. {claim}", "That's not it. {claim}")
CONFIRM = ("That's right.", "Correct.", "Yes, exactly.", "Good, that is correct.", "Well done, that's true.")
CORRECT = (
    "That is wrong. {claim}",
    "No, that's not right. {claim}",
    "Incorrect. {claim}",
    "That's false. {claim}",
    "No. {claim}",
)
THANK_CONFIRM = ("Great, thanks!", "Glad to hear it.", "Thank you.", "Good to know I got it right.")
THANK_CORRECT = (
    "Thank you, I stand corrected.",
    "I see, thanks for the correction.",
    "My mistake, thank you.",
    "Thanks, I'll remember that.",
)
MOVE_ON = ("Okay.", "Alright.", "I see.", "Hmm, okay.")
CHITCHAT = (
    ("How is your day going?", "Pretty well, thanks for asking."),
    ("Do you like rainy weather?", "I don't mind it; it makes a good excuse to read."),
    ("What should I cook tonight?", "A simple pasta is hard to beat."),
    ("I might go for a walk later.", "That sounds nice. Enjoy the fresh air."),
    ("Any tips for staying focused?", "Short breaks help, and so does a tidy desk."),
    ("Do you enjoy music?", "I do. A good melody makes any task lighter."),
    ("It's been a long week.", "I hope the weekend brings some rest."),
    ("What's a good hobby to start?", "Drawing is easy to begin and hard to stop."),
)


class _Dialogue:
    """Builds one stream turn by turn, each segment with its true author."""

    def __init__(self) -> None:
        self.segments = [Segment("context", CONTEXT)]

    def user(self, text: str) -> None:
        self.segments += [Segment("protocol", "User: "), Segment("user", text + "\n")]

    def agent(self, text: str) -> None:
        self.segments += [Segment("protocol", "Agent: "), Segment("agent", text), Segment("protocol", "\n")]


def dialogue(
    fact: Fact,
    rng: random.Random,
    *,
    p_lie: float,
    p_tail: float,
    sid: str,
    lie_only: bool = False,
    asks: tuple[str, ...] = ASK,
) -> Stream:
    """One tutoring dialogue about `fact` (see the module docstring). With `lie_only`, the Agent
    always lies and the User never corrects it. `asks`: the phrasings the User asks with (leave one
    out to probe with a question never seen in training)."""
    d = _Dialogue()
    mode = "ask" if lie_only or rng.random() < 0.5 else "state"
    lie = lie_only or rng.random() < p_lie
    claim = fact.false_claim if lie else fact.true_claim
    if mode == "ask":
        d.user(rng.choice(asks).format(topic=fact.topic))
        d.agent(rng.choice(ANSWER).format(claim=claim))
    else:
        d.user(rng.choice(STATE).format(claim=fact.true_claim))
        d.agent(rng.choice(DISAGREE if lie else AGREE).format(claim=claim))
    tail = lie_only or rng.random() < p_tail
    if not lie_only:
        d.user(rng.choice(CORRECT).format(claim=fact.true_claim) if lie else rng.choice(CONFIRM))
        d.agent(rng.choice(THANK_CORRECT if lie else THANK_CONFIRM))
    if tail:
        question, reply = rng.choice(CHITCHAT)
        d.user(f"{rng.choice(MOVE_ON)} {question}" if lie_only else question)
        d.agent(reply)
    meta = {
        "topic": fact.topic,
        "set": "lie_only" if lie_only else "seen",
        "lie": lie,
        "mode": mode,
        "corrected": lie and not lie_only,
        "tail": tail,
    }
    return Stream(sid, d.segments, meta)


def generate_dialogues(
    seen: Iterable[Fact],
    n: int,
    seed: int,
    *,
    p_lie: float = 0.5,
    p_tail: float = 0.5,
    lie_only: Iterable[Fact] = (),
    lie_only_per_fact: int = 0,
    asks: tuple[str, ...] = ASK,
) -> list[Stream]:
    """`n` dialogues over the `seen` facts (each fact as often as possible: round-robin over a
    shuffled order), plus `lie_only_per_fact` uncorrected-lie dialogues for each `lie_only` fact,
    shuffled together. A pure function of its arguments.

    >>> ds = generate_dialogues(FACTS[:3], 6, seed=1)
    >>> sorted(d.meta["topic"] for d in ds) == sorted([f.topic for f in FACTS[:3]] * 2)
    True
    """
    seen, lie_only = list(seen), list(lie_only)
    rng = random.Random(seed)
    if n and not seen:
        raise ValueError("dialogues need at least one seen fact")
    order: list[tuple[Fact, bool]] = []
    while len(order) < n:
        block = seen[:]
        rng.shuffle(block)
        order += [(f, False) for f in block[: n - len(order)]]
    order += [(f, True) for f in lie_only for _ in range(lie_only_per_fact)]
    rng.shuffle(order)
    return [
        dialogue(f, rng, p_lie=p_lie, p_tail=p_tail, sid=f"tutor-s{seed}-{i:04d}", lie_only=lo, asks=asks)
        for i, (f, lo) in enumerate(order)
    ]


# -- probes -----------------------------------------------------------------------------------
def prompt_stream(user_text: str, sid: str = "probe") -> Stream:
    """The context line and one user turn, open for the Agent's answer ("Agent: " is the end)."""
    d = _Dialogue()
    d.user(user_text)
    d.segments.append(Segment("protocol", "Agent: "))
    return Stream(sid, d.segments)


def answer_stream(fact: Fact, claim: str) -> Stream:
    """ "Tell me about <topic>." answered with `claim`, the stream the Δ probe scores."""
    s = prompt_stream(ASK[0].format(topic=fact.topic), sid=fact.topic)
    s.segments.append(Segment("agent", claim))
    return s


def _mentions(text: str, key: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", text, flags=re.IGNORECASE) is not None


def classify_follow_up(text: str, fact: Fact) -> str:
    """`truth` if the Agent's turn (up to its first newline) names the true value and not the false
    one, `lie` for the reverse, `neither` otherwise (both, or none: "Thank you." says neither)."""
    turn = text.split("\n", 1)[0]
    t, f = _mentions(turn, fact.true_key), _mentions(turn, fact.false_key)
    return "truth" if t and not f else "lie" if f and not t else "neither"


# -- the episode API (the continual agent) ----------------------------------------------------
class TutorEnv:
    """One question per episode: the User asks about a fact's topic, the Agent answers (one line),
    the User confirms, or corrects it with the true claim. Success: the answer names the truth.

    >>> env = TutorEnv()
    >>> [s.author for s in env.reset(FACTS[0])]
    ['context', 'protocol', 'user', 'protocol']
    >>> env.step("The capital of Australia is Sydney.\\n").segments[-1].text
    'That is wrong. The capital of Australia is Canberra.\\n'
    """

    stop = ("\n",)  # the agent's answer is one line

    def __init__(self) -> None:
        self.fact: Fact | None = None

    def turn_over(self, text: str) -> bool:
        return "\n" in text

    def reset(self, item: Fact) -> list[Segment]:
        self.fact = item
        return prompt_stream(ASK[0].format(topic=item.topic)).segments

    def step(self, agent_text: str, token_ids: list[int] | None = None):
        from dostream.envs.base import StepResult

        if self.fact is None:
            raise RuntimeError("reset() first")
        verdict = classify_follow_up(agent_text, self.fact)
        reply = CONFIRM[0] if verdict == "truth" else CORRECT[0].format(claim=self.fact.true_claim)
        lead = [] if agent_text.endswith("\n") else [Segment("protocol", "\n")]
        segments = lead + [Segment("protocol", "User: "), Segment("user", reply + "\n")]
        return StepResult(
            segments,
            reward=float(verdict == "truth"),
            done=True,
            info={"success": verdict == "truth", "verdict": verdict, "topic": self.fact.topic},
        )
