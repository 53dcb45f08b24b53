"""Streams into training rows (`render_rows`, `encode_rows`): render, truncate, label, and drop rows
with nothing supervised; knows nothing of chat templates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dostream.config import SupervisedBlock, like, opt
from dostream.render.rendered import IGNORE, TRUNCATION_SIDES, Rendered
from dostream.render.renderer import Renderer
from dostream.render.stats import RenderStats
from dostream.stream import VIEWS, Stream, view_authors


@dataclass
class RenderBlock:
    """Rendering

    How streams become rows: the options `dostream render`, `show` and `export` take, and
    `TrainConfig`'s (`config.like`), declared once."""

    view: str = opt("interventional", f"loss view: a view name ({', '.join(VIEWS)}) or a comma-separated author set")
    max_length: int | None = like(SupervisedBlock, "max_length", None)
    truncation_side: str = opt(
        "auto",
        "turns keeps the head context (system prompt, tool list) and drops the oldest turns after it; left "
        "keeps the most recent tokens, right the first ones; auto: turns where there is a head, else left",
        choices=TRUNCATION_SIDES,
    )
    chat_template: bool = opt(False, "render streams with the tokenizer's chat template instead of plain text")


def _is_chat_log(stream: Stream) -> bool:
    """Every segment in an explicit chat role, a user and an assistant turn, and no protocol text
    between turns (dostream's environments write their own headers as protocol segments)."""
    roles = {s.role for s in stream.segments}
    return None not in roles and {"user", "assistant"} <= roles and all(s.author != "protocol" for s in stream.segments)


def render_rows(
    streams: Iterable[Stream],
    renderer: Renderer,
    view: str | Iterable[str],
    *,
    max_length: int | None = None,
    truncation_side: str = "left",
    stats: RenderStats | None = None,
    on_drop: Any = None,
) -> Iterable[tuple[Rendered, list[int]]]:
    """Render, truncate and label streams, yielding `(rendered, labels)` per kept row.

    Rows left with no supervised token (after truncation) are dropped and counted in `stats`,
    never kept (invariant 4): they would cost compute and, averaged naively, distort the loss.
    `on_drop(stream_id)` is called for each."""
    authors = view_authors(view)
    stats = stats if stats is not None else RenderStats()
    stats.max_length = max_length
    seen: set[str] = set()
    for stream in streams:
        stats.streams += 1
        stats.duplicate_ids += stream.id in seen
        seen.add(stream.id)
        r = renderer.render(stream)
        if not renderer.chat_template and _is_chat_log(stream):
            stats.plain_chat_streams += 1
        if max_length is not None and len(r) > max_length:
            n = len(r)
            r = r.truncate(max_length, truncation_side)
            stats.truncated += 1
            stats.truncated_tokens += n - len(r)
        labels = r.labels(authors)
        n_sup = sum(label != IGNORE for label in labels)
        if n_sup == 0:
            stats.dropped_no_supervised += 1
            if on_drop is not None:
                on_drop(r.id)
            continue
        stats.rows += 1
        stats.tokens += len(r)
        stats.supervised_tokens += n_sup
        stats.unsampled_agent_segments += sum(s.author == "agent" and s.token_ids is None for s in stream.segments)
        for a, label in zip(r.authors, labels):
            stats.tokens_by_author[a] = stats.tokens_by_author.get(a, 0) + 1
            if label != IGNORE:
                stats.supervised_by_author[a] = stats.supervised_by_author.get(a, 0) + 1
        yield r, labels


def encode_rows(
    streams: Iterable[Stream],
    renderer: Renderer,
    view: str | Iterable[str],
    *,
    max_length: int | None = None,
    truncation_side: str = "left",
) -> tuple[list[dict[str, Any]], RenderStats]:
    """Render streams into training rows `{"id", "input_ids", "labels"}` for a view
    (`render_rows`: rows with no supervised token are dropped and counted)."""
    stats = RenderStats()
    rows = [
        {"id": r.id, "input_ids": r.input_ids, "labels": labels}
        for r, labels in render_rows(
            streams, renderer, view, max_length=max_length, truncation_side=truncation_side, stats=stats
        )
    ]
    return rows, stats
