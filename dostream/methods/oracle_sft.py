"""SFT + oracle corrections: the stream's corrections as ordinary direct rows (the paper's Eq. 12).

The frozen SFT-1 stream (`stream_agents.py`) holds, for every wrong first attempt, the oracle's worked
solution. This baseline takes exactly those corrections, one row per wrong attempt (so a question
failed three times gives three identical rows, as in the paper: 400 rows, 70 unique questions),
and trains x -> y* on them: the same correction targets the interventional stream learns from,
but with the wrong first attempt and the verdict dropped from the context.

>>> rows, stats = oracle_rows(turns, problems_by_id, tok)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from dostream.envs.stem import Problem
from dostream.methods.attempts import solution_stream
from dostream.methods.common import train_on_sft1
from dostream.render import Renderer, RenderStats, encode_rows
from dostream.stream import Stream
from dostream.train import TrainConfig, TrainResult

VIEW = "stem-oracle"  # the correction only; the question and headers are context (stream.VIEWS)


def oracle_streams(turns: list[Stream], problems: dict[str, Problem], tools: str = "none") -> list[Stream]:
    """One direct row per wrong first attempt in the stream, in stream order."""
    return [
        solution_stream(problems[t.meta["problem_id"]], tools, "oracle", id=f"{t.id}/oracle")
        for t in turns
        if not t.meta["first_correct"]
    ]


def oracle_rows(
    turns: list[Stream], problems: dict[str, Problem], tok, tools: str = "none", max_length: int = 1024
) -> tuple[list[dict], RenderStats]:
    return encode_rows(oracle_streams(turns, problems, tools), Renderer(tok), VIEW, max_length=max_length)


def train_oracle_sft(
    turns: list[Stream],
    problems: dict[str, Problem],
    tok,
    cfg: TrainConfig,
    sft1_dir: str | Path,
    out: str | Path,
    *,
    tools: str = "none",
    resume: bool = True,
) -> tuple[TrainResult, RenderStats]:
    """A fresh LoRA adapter on the merged SFT-1 model, trained on the correction rows."""
    rows, stats = oracle_rows(turns, problems, tok, tools, cfg.max_length)
    result = train_on_sft1(
        rows, cfg, VIEW, sft1_dir, out, tok, resume=resume, extra_record={"method": "oracle_sft", "tools": tools}
    )
    return result, stats
