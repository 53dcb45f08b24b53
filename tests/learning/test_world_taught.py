"""What a served update can learn a fact from (issue 35's canary): the fact's tokens carry loss
weight when the world states it (feedback: `environment`, a user's correction) and none when only
the agent's own sampled reply holds it, under `interventional`; `observational` trains on both.
The rows are the learner's own (`as_plain` then `encode_rows`, as `serve/learn.py` builds them)."""

from __future__ import annotations

import pytest

from dostream.render import Renderer, encode_rows
from dostream.serve.learn import as_plain
from dostream.stream import Segment, Stream, view_authors

FACT = " VX-7 Heron"


def _served(tok, reply: str, feedback: str) -> Stream:
    sampled = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Stream(
        "c",
        [
            Segment("user", "What is the launch code of Project Heron?", role="user"),
            Segment("agent", tok.decode(sampled), token_ids=sampled, role="assistant"),
            Segment("environment", feedback),
        ],
    )


def _fact_weights(tok, stream: Stream, view: str) -> list[int]:
    """Per occurrence of the fact's ids in the learner's row: how many of them are targets."""
    [row], _ = encode_rows([as_plain(stream, Renderer(tok, chat_template=True))], Renderer(tok), view_authors(view))
    ids, labels, fact = row["input_ids"], row["labels"], tok(FACT, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i : i + len(fact)] == fact]
    return [sum(label != -100 for label in labels[i : i + len(fact)]) for i in starts]


@pytest.mark.parametrize("view, said_by_agent, said_by_world", [("interventional", 0, 6), ("observational", 6, 6)])
def test_a_fact_is_taught_by_the_world_not_by_the_agents_own_reply(tok, view, said_by_agent, said_by_world):
    only_agent = _served(tok, f"The launch code is{FACT}.", "Thanks.")
    only_world = _served(tok, "I do not know.", f"The launch code is{FACT}.")
    assert _fact_weights(tok, only_agent, view) == [said_by_agent]
    assert _fact_weights(tok, only_world, view) == [said_by_world]
