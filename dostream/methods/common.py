"""What the methods that add a fresh LoRA adapter on SFT-1 share: the training call itself.

ReST, oracle-SFT and the stream's two arms each build their own rows and name their own view;
the rest (SFT-1 merged as the base, a fresh adapter left unmerged, the run record) is this one
function.

>>> result = train_on_sft1(rows, cfg, "stem-rest", "runs/sft1/merged", "runs/rest", tok, extra_record={"method": "rest"})  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dostream.models import load_model
from dostream.train import TrainConfig, TrainResult, train


def train_on_sft1(
    rows: list[dict],
    cfg: TrainConfig,
    view: str,
    sft1_dir: str | Path,
    out: str | Path,
    tok,
    *,
    resume: bool = True,
    extra_record: dict | None = None,
) -> TrainResult:
    """A fresh LoRA adapter on the merged SFT-1 model, trained on `rows` under `view` (not merged)."""
    return train(
        rows,
        replace(cfg, view=view, merge=False),
        out,
        model=load_model(str(sft1_dir)),
        pad_id=tok.pad_token_id,
        resume=resume,
        extra_record=extra_record,
    )
