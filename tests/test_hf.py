"""TRL interop (`dostream/hf.py`, `dostream export`): TRL's SFTTrainer trains on dostream's rows as
they are, with the same loss as `dostream.train`."""

import json

import pytest
from conftest import ROOT

from dostream.hf import to_dataset
from dostream.importers import import_streams
from dostream.render import IGNORE, Renderer, RenderStats, encode_rows

FIX = ROOT / "tests/fixtures/import"


@pytest.fixture(scope="module")
def streams():
    files = [str(FIX / n) for n in ("openai_tools.json", "sharegpt.jsonl", "trl.jsonl")]
    return list(import_streams(files, assistant="other"))


def test_dataset_holds_dostreams_labels(tok, streams):
    stats = RenderStats()
    data = to_dataset(streams, tok, "interventional", chat_template=True, stats=stats)
    rows, _ = encode_rows(streams, Renderer(tok, chat_template=True), "interventional")
    assert data.column_names == ["id", "input_ids", "labels"] and len(data) == len(rows) == stats.rows == 8
    assert data["id"] == [r["id"] for r in rows]
    assert data["input_ids"] == [r["input_ids"] for r in rows] and data["labels"] == [r["labels"] for r in rows]
    assert all(any(x != IGNORE for x in row) for row in data["labels"])
    assert stats.supervised_by_author["teacher"] == stats.tokens_by_author["teacher"]


def test_trl_sft_trainer_one_step_matches_dostream_train(tok, streams, tmp_path):
    """Issue 16, TRL interop: one optimizer step of TRL's SFTTrainer on `to_dataset` rows (default
    data handling: it sees `input_ids` and passes `labels` through) logs the loss `dostream.train`
    logs on the same rows from the same weights."""
    from trl import SFTConfig, SFTTrainer

    from dostream.models import load_model
    from dostream.train import TrainConfig, train

    data = to_dataset(streams[:4], tok, "interventional", chat_template=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(data),
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-3,
        max_length=None,  # rows are already cut (dostream keeps the head context)
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=load_model("tiny:2"), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    trl_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)

    rows = [{"id": r["id"], "input_ids": r["input_ids"], "labels": r["labels"]} for r in data]
    cfg = TrainConfig(model="tiny:2", max_steps=1, batch_size=len(rows), lr=1e-3, precision="fp32", progress=False)
    ours = train(rows, cfg, tmp_path / "dostream").metrics[0]["train/loss"]
    assert 5 < ours < 20 and trl_loss == pytest.approx(ours, rel=1e-4, abs=1e-4)


def test_export_hf_and_parquet(tok, streams, tmp_path):
    from datasets import load_dataset, load_from_disk

    from dostream.cli.main import main

    src = tmp_path / "streams.jsonl"
    src.write_text("".join(json.dumps(s.to_json()) + "\n" for s in streams))
    want = to_dataset(streams, tok, "interventional", chat_template=True)
    assert main(["export", str(src), "--chat-template", "--out", str(tmp_path / "ds")]) == 0
    got = load_from_disk(str(tmp_path / "ds"))
    assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    assert (
        main(["export", str(src), "--chat-template", "--format", "parquet", "--out", str(tmp_path / "d.parquet")]) == 0
    )
    pq = load_dataset("parquet", data_files=str(tmp_path / "d.parquet"), split="train")
    assert pq["labels"] == want["labels"] and pq["id"] == want["id"]
    assert main(["export", str(src), "--out", str(tmp_path / "ds"), "--view", "observational"]) == 0  # replaced
    assert load_from_disk(str(tmp_path / "ds"))["labels"] != want["labels"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "ds", "streams.jsonl"]  # no temp left
