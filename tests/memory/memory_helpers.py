"""What the memory tests share: the discount streams (the seed's three-case shape) and `CopyLM`."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dostream.stream import Segment, Stream

RULE = "No: only veterans and physicians qualify for the discount."


def discount_stream(i: int, who: str, *, user: str | None = None, rule: str = RULE) -> Stream:
    """A user asks for the discount as `who`; the agent wrongly agrees; the user corrects it."""
    meta = {"user": user} if user else {}
    return Stream(
        f"d{i}",
        [
            Segment("protocol", "User: "),
            Segment("user", f"Can I get the discount as a {who}?\n"),
            Segment("protocol", "Agent: "),
            Segment("agent", "Yes, everyone qualifies for the discount.\n"),
            Segment("protocol", "User: "),
            Segment("user", rule),
        ],
        meta,
    )


def capital_stream(i: int) -> Stream:
    return Stream(
        f"c{i}",
        [
            Segment("user", "What is the capital of France?\n"),
            Segment("agent", "Rome.\n"),
            Segment("user", "Wrong, it is Paris."),
        ],
    )


class CopyLM(torch.nn.Module):
    """A language model whose one skill is copying from its context (a unigram cache): the logit of
    a token is `strength` if it occurred at or before the current position, else 0. A real model
    with real probabilities, scored through `dostream.scoring` like any other; unlike a random tiny
    model, what a note in its context does to the world tokens' likelihood is known by construction:
    a note that holds the world's words raises it, a note of other words lowers it."""

    def __init__(self, vocab_size: int, strength: float = 4.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.strength = torch.nn.Parameter(torch.tensor(strength))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        seen = torch.zeros((*input_ids.shape, self.vocab_size))
        seen.scatter_(2, input_ids[..., None], 1.0)
        if attention_mask is not None:
            seen = seen * attention_mask[..., None]
        return SimpleNamespace(logits=self.strength * seen.cumsum(1).clamp(max=1.0))
