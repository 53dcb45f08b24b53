"""Hugging Face interop: dostream streams → a `datasets.Dataset` that TRL trains on as it is.

`to_dataset(streams, tokenizer, view)` renders the streams (as `dostream render` and `dostream
train` do: one author per token, the view's labels, rows with no supervised token dropped) into
columns `id`, `input_ids` and `labels` (-100 where masked). TRL's `SFTTrainer` treats a dataset
with `input_ids` as already tokenised and passes a `labels` column through untouched, so it trains
on exactly dostream's supervision:

    from trl import SFTConfig, SFTTrainer
    data = to_dataset(read_streams("streams.jsonl"), tokenizer, "interventional")
    SFTTrainer(model=model, args=SFTConfig(output_dir="out", max_length=None), train_dataset=data,
               processing_class=tokenizer).train()

(`max_length=None`: truncate in dostream, `max_length=` here, which keeps the head context; TRL's
own truncation keeps the start of each row.) `dostream export --format hf|parquet` writes the same
dataset to disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dostream.render import Renderer, RenderStats, render_rows
from dostream.stream import Stream


def rows_to_dataset(rows: Iterable[dict[str, Any]]):
    """`{"id", "input_ids", "labels"}` rows → a `datasets.Dataset` with those columns."""
    from datasets import Dataset, Features, Sequence, Value

    ids, input_ids, labels = [], [], []
    for r in rows:
        ids.append(str(r["id"]))
        input_ids.append(list(r["input_ids"]))
        labels.append(list(r["labels"]))
    features = Features(
        {"id": Value("string"), "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}
    )
    return Dataset.from_dict({"id": ids, "input_ids": input_ids, "labels": labels}, features=features)


def to_dataset(
    streams: Iterable[Stream],
    tokenizer,
    view: str | Iterable[str] = "interventional",
    *,
    chat_template: bool = False,
    max_length: int | None = None,
    truncation_side: str = "auto",
    stats: RenderStats | None = None,
):
    """Render `streams` under `view` into a `datasets.Dataset` (`id`, `input_ids`, `labels`) for
    TRL's `SFTTrainer` or any trainer that reads labels. `stats` (a `RenderStats`), if given,
    receives the counts and the per-author split."""
    renderer = Renderer(tokenizer, chat_template=chat_template)
    rows = (
        {"id": r.id, "input_ids": r.input_ids, "labels": labels}
        for r, labels in render_rows(
            streams, renderer, view, max_length=max_length, truncation_side=truncation_side, stats=stats
        )
    )
    return rows_to_dataset(rows)
