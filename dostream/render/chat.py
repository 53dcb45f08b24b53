"""The chat-template path: a stream's messages through the tokenizer's own template, every character
attributed to its author; knows nothing of tokenisation (it returns pieces)."""

from __future__ import annotations

import re

from dostream.render.pieces import _messages, _Piece, _tool_meta
from dostream.render.reasoning import in_template_markers, is_reasoning
from dostream.render.rendered import RenderError
from dostream.render.tools import tool_chat_pieces, writes_tools
from dostream.stream import Stream


def chat_pieces(renderer, stream: Stream, add_generation_prompt: bool) -> list[_Piece]:
    """The pieces of a stream rendered with `renderer`'s chat template (the tool path where the
    stream has tool calls or a tool list and the template writes them): message contents are
    located by sentinels, and the template text between them is `context` (before the first
    message), the end-of-turn marker (the turn's author) or `protocol`. Reasoning segments are
    written in the template's own markers (`reasoning.py`)."""
    stream = in_template_markers(renderer, stream)
    try:
        return _chat_pieces(renderer, stream, add_generation_prompt)
    except RenderError as e:
        if "rewrites message content" in str(e) and any(is_reasoning(s) for s in stream.segments):
            raise RenderError(
                f"{e} (a template that keeps only the reasoning of the turns after the last user message, "
                "as Qwen3's does, drops the reasoning of earlier turns)"
            ) from None
        raise


def _chat_pieces(renderer, stream: Stream, add_generation_prompt: bool) -> list[_Piece]:
    messages = _messages(stream)
    if any(_tool_meta(s) for s in stream.segments) and writes_tools(renderer):
        return tool_chat_pieces(renderer, stream, messages, add_generation_prompt)
    sentinels = [f"\u2063DOSTREAM{i}\u2063" for i in range(len(messages))]
    templated = renderer.tok.apply_chat_template(
        [{"role": m["role"], "content": sentinels[k]} for k, m in enumerate(messages)],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    between = re.split("|".join(map(re.escape, sentinels)), templated)
    if len(between) != len(messages) + 1:
        raise RenderError(f"stream {stream.id!r}: the chat template drops or repeats messages; use plain rendering")
    contents = ["".join(s.text for _, s in m["segments"]) for m in messages]
    expected = renderer.tok.apply_chat_template(
        [{"role": m["role"], "content": c} for m, c in zip(messages, contents)],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    if expected != "".join(b + c for b, c in zip(between, contents + [""])):
        raise RenderError(
            f"stream {stream.id!r}: the chat template rewrites message content (e.g. strips whitespace), "
            "so characters cannot be attributed to their authors; use plain rendering"
        )
    pieces = [_Piece("context", between[0], None, "template preamble")]
    for k, m in enumerate(messages):
        pieces += [_Piece(s.author, s.text, s.token_ids, f"segment {i}", k) for i, s in m["segments"]]
        after = between[k + 1]
        owner = m["segments"][-1][1]
        # The end-of-turn marker belongs to whoever wrote the turn. An agent that sampled the
        # marker itself already owns it in its token_ids, so the template's copy is dropped.
        marker = next((t for t in renderer._special if after.startswith(t)), None)
        if marker is not None:
            after = after[len(marker) :]
            if not owner.text.endswith(marker):
                pieces.append(_Piece(owner.author, marker, None, f"end of turn {k}", k))
        # what follows is the next message's header: it goes with that turn
        pieces.append(_Piece("protocol", after, None, f"template after message {k}", min(k + 1, len(messages) - 1)))
    return pieces
