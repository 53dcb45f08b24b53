"""The stream agents: one stream of frozen SFT-1 attempts, two ways to learn from it (Eq. 13-14).

Stream construction (the paper's §2.2). The frozen SFT-1 model walks through D_agent (a fresh
shuffle each pass) and attempts each item once, sampling at temperature `temperature`; the
verifier grades the attempt. A correct attempt is followed by "Verdict: correct."; a wrong one by
"Verdict: incorrect.", a fresh "Proposed solution:" header and the oracle's worked solution. The
walk stops at the turn that brings the count of wrong first attempts to `n_wrong` (400 in the
paper, which took 785 turns). Each turn is one training row; the agent's attempt keeps the exact
ids SFT-1 sampled.

The two arms train on the same rows and differ only in the labels (the paper's STEM author set):

* observational: the agent's attempts and the oracle corrections are supervised;
* interventional: only the oracle corrections; the attempt stays in the context as do(ŷ).

The question, the headers and the verdict are masked in both. So a correct turn gives the
interventional arm no supervised token at all (the row is dropped: no gradient either way), and a
wrong turn teaches it the repair map (x, do(ŷ), v) -> y*.

>>> turns = build_stream(sft1, tok, agent_problems, StreamConfig(n_wrong=400))  # doctest: +SKIP
>>> rows, stats = arm_rows(turns, tok, "interventional")                       # doctest: +SKIP
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from dostream.config import opt
from dostream.envs.stem import Problem
from dostream.methods.attempts import attempt
from dostream.methods.common import train_on_sft1
from dostream.render import Renderer, RenderStats, encode_rows
from dostream.sampling import SamplingConfig
from dostream.stream import Stream
from dostream.train import TrainConfig, TrainResult

# The two arms and their views (stream.VIEWS): question, headers and verdict are masked in both.
ARMS: dict[str, str] = {"observational": "stem-observational", "interventional": "stem-oracle"}


@dataclass
class StreamConfig:
    n_wrong: int = opt(400, "stop the stream at this many wrong first attempts (the paper: 400)")
    temperature: float = opt(1.0, "SFT-1's sampling temperature while it attempts D_agent items")
    max_new_tokens: int = opt(128, "tokens per attempt")
    chunk: int = opt(32, "items attempted per sampling call (batched); the stream is cut at the n_wrong-th wrong one")
    max_passes: int = opt(
        50, "give up after this many passes over D_agent (a model that is always right never fills the stream)"
    )
    seed: int = opt(0, "seed for the pass order and the samples")
    tools: str = opt("none", "none or calculator")
    progress: bool = opt(True, "show a progress bar")


def build_stream(model, tok, problems: list[Problem], cfg: StreamConfig) -> list[Stream]:
    """The frozen model's turns, in order, up to and including the `n_wrong`-th wrong first attempt.

    Each turn's meta holds `problem_id`, `skill`, `first_correct`, `turn` (its index) and `pass`."""
    from tqdm.auto import tqdm

    if cfg.n_wrong < 1:
        raise ValueError("the stream needs at least one wrong attempt to stop at")
    rng = random.Random(f"stream:{cfg.seed}")
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    turns: list[Stream] = []
    wrong = 0
    bar = tqdm(total=cfg.n_wrong, desc="stream (wrong first attempts)", disable=not cfg.progress, dynamic_ncols=True)
    queue: list[tuple[int, Problem]] = []
    for pass_ in range(cfg.max_passes):
        order = list(problems)
        rng.shuffle(order)
        queue += [(pass_, p) for p in order]
        while len(queue) >= cfg.chunk or (queue and pass_ == cfg.max_passes - 1):
            batch, queue = queue[: cfg.chunk], queue[cfg.chunk :]
            ids = [f"turn-{len(turns) + i:05d}" for i in range(len(batch))]
            sampling = replace(sampling, seed=cfg.seed * 100_003 + len(turns))
            streams = attempt(model, tok, [p for _, p in batch], sampling, tools=cfg.tools, ids=ids, progress=False)
            for (ps, p), s in zip(batch, streams):
                s.meta.update({"turn": len(turns), "pass": ps, "problem_id": p.id})
                turns.append(s)
                if not s.meta["first_correct"]:
                    wrong += 1
                    bar.update(1)
                    if wrong == cfg.n_wrong:
                        bar.close()
                        return turns
            bar.set_postfix(turns=len(turns))
    bar.close()
    raise RuntimeError(
        f"only {wrong} wrong first attempts in {len(turns)} turns ({cfg.max_passes} passes over "
        f"{len(problems)} items); lower n_wrong"
    )


def arm_rows(turns: list[Stream], tok, arm: str, max_length: int = 1024) -> tuple[list[dict], RenderStats]:
    """Training rows of one arm. Same `input_ids` in both arms, row for row; only labels differ.
    (The interventional arm drops the rows of correct turns: no supervised token.)"""
    return encode_rows(turns, Renderer(tok), ARMS[arm], max_length=max_length)


def composition(turns: list[Stream]) -> dict[str, dict[str, int]]:
    """Per skill: correct and wrong first attempts in the stream (the paper's Figure 3)."""
    out: dict[str, dict[str, int]] = {}
    for t in turns:
        c = out.setdefault(t.meta["skill"], {"correct": 0, "wrong": 0})
        c["correct" if t.meta["first_correct"] else "wrong"] += 1
    return dict(sorted(out.items()))


def train_arm(
    turns: list[Stream], tok, arm: str, cfg: TrainConfig, sft1_dir: str | Path, out: str | Path, *, resume: bool = True
) -> tuple[TrainResult, RenderStats]:
    """A fresh LoRA adapter on the merged SFT-1 model, trained on the stream under `arm`'s labels."""
    rows, stats = arm_rows(turns, tok, arm, cfg.max_length)
    result = train_on_sft1(
        rows, cfg, ARMS[arm], sft1_dir, out, tok, resume=resume, extra_record={"method": f"stream_{arm}"}
    )
    return result, stats
