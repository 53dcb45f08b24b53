"""Rendering: a `Stream` → token ids with, for every token, the author who wrote it.

Two renderers share one rule: **every segment is tokenised on its own**, so a segment boundary is
always a token boundary. No token ever straddles two authors (invariant 1 holds by construction),
rendering is prefix-stable (the ids of a stream's first k segments are a prefix of the whole
stream's ids: what the model saw while sampling is what it is trained on), and agent segments with
sampled `token_ids` are emitted as those exact ids, never re-tokenised (invariant 2).

* plain: segments concatenated verbatim, then the end-of-sequence token, owned by the author of the
  last segment (the world's answer ends there; an agent that sampled its own EOS keeps it).
* chat template: the tokenizer's own template. Template text (role headers, turn markers) is
  authored `protocol`, the preamble before the first message (e.g. a default system prompt) is
  `context`, and the end-of-turn marker right after a message belongs to that message's author:
  the agent's decision to stop is its action; a teacher's turn end is supervised.

Labels come from one place, `Rendered.labels(view)`: supervised = True ⇔ the token's author is in
the view; -100 elsewhere. Position 0 is never supervised (nothing precedes it to predict it from).

>>> from dostream.models import load_tokenizer          # doctest: +SKIP
>>> r = Renderer(load_tokenizer("smollm2")).render(stream)  # doctest: +SKIP
>>> r.labels("interventional")                          # doctest: +SKIP

The package in data-flow order: `pieces.py` (a stream cut into authored pieces), `chat.py` and
`tools.py` (the chat-template paths), `renderer.py` (`Renderer`: pieces into token ids),
`rendered.py` (`Rendered`: labels, truncation), `rows.py` (`render_rows`, `encode_rows`, and
`RenderBlock`, their options),
`stats.py` (`RenderStats`).
"""

from __future__ import annotations

from dostream.render.pieces import AUTHOR_ROLES
from dostream.render.rendered import IGNORE, TRUNCATION_SIDES, Rendered, RenderError
from dostream.render.renderer import Renderer, decode
from dostream.render.rows import RenderBlock, encode_rows, render_rows
from dostream.render.stats import RenderStats

__all__ = [
    "AUTHOR_ROLES",
    "IGNORE",
    "TRUNCATION_SIDES",
    "RenderBlock",
    "RenderError",
    "RenderStats",
    "Rendered",
    "Renderer",
    "decode",
    "encode_rows",
    "render_rows",
]
