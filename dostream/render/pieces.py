"""What the renderers tokenise: a stream's segments as authored pieces, grouped into chat messages;
knows nothing of tokens or templates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dostream.stream import Segment, Stream

# Where a segment without an explicit role sits in a chat template.
AUTHOR_ROLES: dict[str, str] = {
    "context": "system",
    "agent": "assistant",
    "teacher": "assistant",
    "oracle": "assistant",
    "tool": "tool",
    "user": "user",
    "verifier": "user",
    "environment": "user",
    "protocol": "user",
}


@dataclass
class _Piece:
    author: str
    text: str
    token_ids: list[int] | None = None
    where: str = ""  # for error messages
    turn: int = 0  # the turn (message) it belongs to, for truncation by turns


def _messages(stream: Stream) -> list[dict[str, Any]]:
    """Segments grouped into chat messages: a segment's `role`, else `AUTHOR_ROLES[author]`;
    consecutive segments with the same role share one message, unless a segment's
    `meta.new_message` is true (two tool answers in a row, as imported logs have them).
    `{"role", "segments": [(i, seg)]}`."""
    messages: list[dict[str, Any]] = []
    for i, s in enumerate(stream.segments):
        role = s.role or AUTHOR_ROLES[s.author]
        if messages and messages[-1]["role"] == role and not s.meta.get("new_message"):
            messages[-1]["segments"].append((i, s))
        else:
            messages.append({"role": role, "segments": [(i, s)]})
    return messages


def _tool_meta(seg: Segment) -> str | None:
    """`"calls"` for a tool-call segment (its text is the text form of `meta.tool_calls`; sampled
    ids are exact text and stay text), `"tools"` for a tool-list segment (`meta.tools`), else None."""
    if seg.token_ids is None and isinstance(seg.meta.get("tool_calls"), list) and seg.meta["tool_calls"]:
        return "calls"
    if seg.author == "context" and isinstance(seg.meta.get("tools"), list) and seg.meta["tools"]:
        return "tools"
    return None
