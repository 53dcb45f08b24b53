"""SFT + ReST: learn from the policy's own verifier-passing samples (the paper's Eq. 8-9).

From SFT-1, draw K samples for each of `groups` prompts of D_agent (a group per prompt), grade
them with the verifier, keep the samples that pass and are parseable (the verifier read the answer
on a `Final answer:` line, not from the last-number fallback), drop duplicates
(same token ids), and keep at most one per group (the first kept, in sampling order). The
selected samples plus the D_sft teacher rows as replay make the training set; one epoch of SFT on
it. The selected samples are the agent's own actions, so ReST supervises `agent` tokens: that is
the method (imitating filtered self-actions), not a labelling accident.

In the paper: 400 samples in 50 groups of 8 -> 30 kept + 200 replay = 230 rows.

>>> selected, info = select(groups)   # doctest: +SKIP
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from dostream.config import opt
from dostream.envs.stem import Problem
from dostream.methods.attempts import attempt, solution_stream, until_verdict
from dostream.methods.common import train_on_sft1
from dostream.render import Renderer, RenderStats, encode_rows
from dostream.sampling import SamplingConfig
from dostream.stream import Stream
from dostream.train import TrainConfig, TrainResult

VIEW = "stem-rest"  # the selected samples and the replay rows' solutions (stream.VIEWS)


@dataclass
class RestConfig:
    groups: int = opt(50, "prompts from D_agent, each sampled K times (a group)")
    k: int = opt(8, "samples per prompt (K)")
    temperature: float = opt(1.0, "sampling temperature")
    max_new_tokens: int = opt(128, "tokens per sample")
    per_group: int = opt(1, "keep at most this many passing samples per group")
    replay: bool = opt(True, "add the D_sft teacher rows as replay")
    seed: int = opt(0, "seed for the prompt choice and the samples")
    tools: str = opt("none", "none or calculator")
    progress: bool = opt(True, "show a progress bar")


def sample_groups(model, tok, problems: list[Problem], cfg: RestConfig) -> list[list[Stream]]:
    """`cfg.groups` prompts of `problems` (a seeded choice), K graded samples each."""
    chosen = random.Random(f"rest:{cfg.seed}").sample(problems, min(cfg.groups, len(problems)))
    flat = [p for p in chosen for _ in range(cfg.k)]
    ids = [f"{p.id}/g{g}/k{j}" for g, p in enumerate(chosen) for j in range(cfg.k)]
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    streams = attempt(model, tok, flat, sampling, tools=cfg.tools, ids=ids, desc="ReST samples", progress=cfg.progress)
    return [streams[g * cfg.k : (g + 1) * cfg.k] for g in range(len(chosen))]


def parseable(stream: Stream) -> bool:
    """The verifier read the answer after a `Final answer:` marker (not the last-number fallback)."""
    verdict = stream.meta.get("verdict") or {}
    return bool(verdict.get("marked")) and verdict.get("answer") is not None


def select(groups: list[list[Stream]], per_group: int = 1) -> tuple[list[Stream], dict[str, int]]:
    """Passing, parseable, deduplicated samples, at most `per_group` per group (attempt parts only)."""
    selected: list[Stream] = []
    info = {"samples": 0, "passing": 0, "passing_parseable": 0, "duplicates": 0, "groups_with_pass": 0}
    for group in groups:
        seen: set[tuple[int, ...]] = set()
        kept = 0
        for s in group:
            info["samples"] += 1
            if not s.meta["first_correct"]:
                continue
            info["passing"] += 1
            if not parseable(s):
                continue
            info["passing_parseable"] += 1
            attempt_part = until_verdict(s)
            key = tuple(t for seg in attempt_part.segments if seg.author == "agent" for t in seg.token_ids or [])
            if key in seen:
                info["duplicates"] += 1
                continue
            seen.add(key)
            if kept < per_group:
                selected.append(attempt_part)
                kept += 1
        info["groups_with_pass"] += kept > 0
    info["selected"] = len(selected)
    return selected, info


def rest_rows(
    selected: list[Stream], replay: list[Problem], tok, tools: str = "none", max_length: int = 1024
) -> tuple[list[dict], RenderStats]:
    """Selected samples (agent supervised; no EOS is added to a sample that did not sample one)
    and the replay rows (teacher supervised, closed by EOS as in SFT-1)."""
    rows, stats = encode_rows(selected, Renderer(tok, add_eos=False), VIEW, max_length=max_length)
    more, more_stats = encode_rows(
        [solution_stream(p, tools, "teacher") for p in replay], Renderer(tok), VIEW, max_length=max_length
    )
    for k in ("streams", "rows", "truncated", "dropped_no_supervised", "tokens", "supervised_tokens"):
        setattr(stats, k, getattr(stats, k) + getattr(more_stats, k))
    for d, extra in (
        (stats.tokens_by_author, more_stats.tokens_by_author),
        (stats.supervised_by_author, more_stats.supervised_by_author),
    ):
        for a, n in extra.items():
            d[a] = d.get(a, 0) + n
    return rows + more, stats


def train_rest(
    selected: list[Stream],
    replay: list[Problem],
    tok,
    cfg: TrainConfig,
    sft1_dir: str | Path,
    out: str | Path,
    *,
    tools: str = "none",
    resume: bool = True,
) -> tuple[TrainResult, RenderStats]:
    """A fresh LoRA adapter on the merged SFT-1 model, trained on the selected samples + replay."""
    rows, stats = rest_rows(selected, replay, tok, tools, cfg.max_length)
    result = train_on_sft1(
        rows, cfg, VIEW, sft1_dir, out, tok, resume=resume, extra_record={"method": "rest", "tools": tools}
    )
    return result, stats
