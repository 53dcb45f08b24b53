"""SFT-1: the seed policy every other method starts from (the paper's Eq. 7).

One epoch on the clean teacher rows of D_sft. A row is the paper's prompt (`Question:\\n<q>\\n\\n
Proposed solution:\\n`, plus the tool hint in the calculator variant) followed by the worked
solution, authored `teacher`; only the solution (and the EOS that closes it) is supervised: the
question and the headers are context the model never has to predict. In the calculator variant the
solution demonstrates `calc(...)` calls and the tool's answers sit between its pieces as `tool`
segments, masked too: the tool computes them, the model does not have to.

The result is saved merged (`OUT/merged`), so each later method adds a fresh LoRA adapter on top
of SFT-1 and GRPO's reference policy is simply the model with its adapter disabled.

>>> result = train_sft1(problems, tok, TrainConfig(model="tiny", epochs=1), "runs/sft1")  # doctest: +SKIP
>>> load_model("runs/sft1/merged")                                                        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dostream.envs.stem import Problem
from dostream.methods.attempts import solution_stream
from dostream.render import Renderer, RenderStats, encode_rows
from dostream.stream import Stream
from dostream.train import TrainConfig, TrainResult, train

# The supervised author set: the teacher's solution, nothing else.
VIEW = "teacher"  # the demonstration after the prompt (stream.VIEWS)


def sft1_streams(problems: list[Problem], tools: str = "none") -> list[Stream]:
    """The teacher rows of D_sft as streams (prompt as context/protocol, the solution as teacher)."""
    return [solution_stream(p, tools, "teacher") for p in problems]


def sft1_rows(
    problems: list[Problem], tok, tools: str = "none", max_length: int = 1024
) -> tuple[list[dict], RenderStats]:
    """Training rows `{"id", "input_ids", "labels"}`: labels are -100 everywhere but the solution."""
    return encode_rows(sft1_streams(problems, tools), Renderer(tok), VIEW, max_length=max_length)


def train_sft1(
    problems: list[Problem], tok, cfg: TrainConfig, out: str | Path, *, tools: str = "none", resume: bool = True
) -> tuple[TrainResult, RenderStats]:
    """Train SFT-1 from `cfg.model` (a fresh LoRA adapter) and save it merged under OUT/merged."""
    rows, stats = sft1_rows(problems, tok, tools, cfg.max_length)
    cfg = replace(cfg, view=VIEW, merge=True)
    result = train(
        rows, cfg, out, pad_id=tok.pad_token_id, resume=resume, extra_record={"method": "sft1", "tools": tools}
    )
    return result, stats
