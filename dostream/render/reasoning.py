"""Reasoning under a chat template: a reasoning segment (`meta.reasoning: true`, written by the
importers in the default form `<think>\n...\n</think>\n\n`) is rendered in the template's own
markers where the template writes reasoning itself (`toolcalls.template_reasoning_markers`), else
as it is; knows nothing of tokenisation (it returns a stream).

The reasoning stays a segment of its own, tokenised on its own, with the turn's author: only the
characters around its body change. Sampled ids are never touched (a segment with `token_ids` is
the model's exact text, whatever it holds)."""

from __future__ import annotations

from dataclasses import replace

from dostream.stream import Stream


def is_reasoning(seg) -> bool:
    """A reasoning segment as the importers write it (no sampled ids)."""
    return seg.token_ids is None and seg.meta.get("reasoning") is True


def in_template_markers(renderer, stream: Stream) -> Stream:
    """`stream` with each reasoning segment's body between the template's markers (the stream
    itself where there is none to change, or the template writes no reasoning)."""
    if not any(is_reasoning(s) for s in stream.segments):
        return stream
    if not hasattr(renderer, "_reasoning_markers"):
        from dostream.toolcalls import template_reasoning_markers

        renderer._reasoning_markers = template_reasoning_markers(renderer.tok)
    markers = renderer._reasoning_markers
    if markers is None:
        return stream
    from dostream.toolcalls import reasoning_body

    segments = []
    for s in stream.segments:
        body = reasoning_body(s.text) if is_reasoning(s) else None
        segments.append(s if body is None else replace(s, text=markers[0] + body + markers[1]))
    return replace(stream, segments=segments)
