"""Who writes an abstractive note: a model asked for one rule over several cases, K candidates at a time.

A `Writer` is anything with `write(cases, k) -> list[str]`. Two are here:

* `LocalWriter`: a Hugging Face model through dostream's own sampler (`dostream.sampling.sample`):
  the served model, or any model `dostream.models.load_model` loads. The prompt is the tokenizer's
  chat template where it has one (plain text otherwise); the K candidates are the same prompt K
  times, each row with its own random stream.
* `EndpointWriter`: any OpenAI-compatible endpoint (a base URL and a model name, through the
  `openai` client: `pip install openai`), `n=k` in one request, topped up one at a time where an
  endpoint returns fewer choices.

The writer sees only world-authored text (the cases are evidence spans), never the agent's claims.
What it writes is a candidate, not a note: admission (`admit.py`) decides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from dostream.stream import Segment, Stream

INSTRUCTION = (
    "You keep a memory of what the world said. Below are statements from users, tools and teachers "
    "in similar situations. Write ONE short general rule, in one sentence, that covers all of them "
    "and would help in a new case like them. Write only the rule."
)


def prompt_messages(cases: Sequence[str]) -> list[dict[str, str]]:
    """The writer's chat messages: the instruction, then the cases, numbered."""
    listing = "\n".join(f"{i}. {' '.join(c.split())}" for i, c in enumerate(cases, 1))
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": f"Cases:\n{listing}\n\nRule:"}]


def clean(text: str) -> str:
    r"""A candidate's first paragraph, its whitespace folded, less a leading "Rule:" or list marker
    ('' if nothing is left).

    >>> clean("Rule: 1. Only veterans qualify.\n\nMore.")
    'Only veterans qualify.'
    """
    first = " ".join(text.strip().split("\n\n")[0].split())
    return re.sub(r"^(?:rule:\s*)?(?:(?:\d+[.)]|[-*])\s+)?", "", first, flags=re.I)


class Writer(Protocol):
    def write(self, cases: Sequence[str], k: int) -> list[str]: ...


class LocalWriter:
    """A local model writes the K candidates (dostream's sampler; `config` its settings)."""

    def __init__(self, model, tok, config=None):
        from dostream.render import Renderer
        from dostream.sampling import SamplingConfig

        self.model, self.tok = model, tok
        self.config = config or SamplingConfig(temperature=0.7, max_new_tokens=64)
        self.renderer = Renderer(tok, chat_template=bool(getattr(tok, "chat_template", None)))

    def write(self, cases: Sequence[str], k: int) -> list[str]:
        from dostream.sampling import sample

        segments = [
            Segment(a, m["content"], role=m["role"]) for a, m in zip(("context", "user"), prompt_messages(cases))
        ]
        prompt = self.renderer.prompt_ids(Stream("writer", segments))
        ends = [t for t in (self.tok.eos_token,) if t]
        out = []
        for s in sample(self.model, self.tok, [prompt] * k, self.config):
            text = s.text
            for end in ends:
                text = text.split(end)[0]
            out.append(clean(text))
        return out


class EndpointWriter:
    """An OpenAI-compatible endpoint writes the K candidates."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 96,
        timeout: float = 120.0,
    ):
        try:
            import openai
        except ImportError as e:  # not a dependency of dostream itself
            raise OSError("an endpoint writer needs the openai client: pip install openai") from e
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=1)
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens

    def write(self, cases: Sequence[str], k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=prompt_messages(cases),
                n=k - len(out) if not out else 1,
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
            if not reply.choices:
                raise OSError(f"{self.client.base_url}: the endpoint returned no choices")
            out += [clean(c.message.content or "") for c in reply.choices]
        return out[:k]
