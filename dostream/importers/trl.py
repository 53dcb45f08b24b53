"""TRL dataset rows → segments.

Conversational rows (`messages`, with `tools`) are OpenAI messages (`openai.py`). Prompt-completion
rows hold `prompt` and `completion`, each a string (the prompt is the user turn, the completion the
assistant's) or a list of messages (conversational prompt-completion).
"""

from __future__ import annotations

from typing import Any

from dostream.importers.base import Builder, Provenance, RecordError, add_assistant_text, checked_tools, message_author
from dostream.importers.openai import add_messages
from dostream.stream import Segment


def to_segments(record: dict, prov: Provenance, tools: Any) -> tuple[list[Segment], int]:
    b = Builder()
    b.tools = checked_tools(tools, "tools")
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list):
        add_messages(b, prompt, prov, "prompt")
    elif isinstance(prompt, str):
        b.add("user", "user", prompt)
    else:
        raise RecordError("prompt", "expected a string or a list of messages")
    if isinstance(completion, list):
        add_messages(b, completion, prov, "completion")
    elif isinstance(completion, str):
        if not completion:
            raise RecordError("completion", "an assistant turn with neither content nor a tool call")
        add_assistant_text(b, message_author(record, "assistant", "assistant", prov, "completion"), completion)
    else:
        raise RecordError("completion", "expected a string or a list of messages")
    return b.finish(), b.n_calls
