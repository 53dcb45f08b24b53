"""`dostream export STREAMS --out PATH --format hf|parquet`: labelled rows for TRL and friends.

Renders the streams exactly as `dostream render` and `dostream train` do (same options: view,
chat template, truncation) and writes columns `id`, `input_ids`, `labels` (-100 where masked):
`--format hf` a `datasets.Dataset.save_to_disk` directory (`datasets.load_from_disk(PATH)`),
`--format parquet` one Parquet file (`datasets.load_dataset("parquet", data_files=PATH)`). TRL's
`SFTTrainer` trains on either as it is (see `dostream/hf.py`). PATH is replaced only once the new
dataset is complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dostream.cli._common import CliError, user_errors, views_epilog
from dostream.cli.render import add_render_args, iter_rendered, print_report


def _write(dataset, out: Path, fmt: str) -> None:
    """Write beside `out`, then move into place: readers see the old dataset or the new one."""
    from datasets import disable_progress_bars

    disable_progress_bars()  # one summary line on stderr is the console output
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "parquet":
            dataset.to_parquet(str(tmp / "data.parquet"))
            os.replace(tmp / "data.parquet", out)
        else:
            dataset.save_to_disk(str(tmp / "data"))
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            os.replace(tmp / "data", out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dostream export",
        description=__doc__.split("\n\n")[0],
        epilog=views_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_render_args(p)
    p.add_argument("--out", required=True, help="the dataset directory (hf) or Parquet file (parquet) to write")
    p.add_argument("--format", choices=("hf", "parquet"), default="hf", help="hf: save_to_disk directory; parquet")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.format == "parquet" and out.is_dir():
        raise CliError(f"--out: {out} is a directory; --format parquet writes one file")
    if args.format == "hf" and out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} is a file; --format hf writes a directory")
    from dostream.hf import rows_to_dataset
    from dostream.models import load_tokenizer
    from dostream.render import RenderStats

    with user_errors():
        tokenizer = load_tokenizer(args.tokenizer)
    stats = RenderStats()
    rows = [
        {"id": r.id, "input_ids": r.input_ids, "labels": r.labels(args.view)}
        for r in iter_rendered(args, tokenizer, stats)
    ]
    print_report("export", stats, args.view)
    if not rows:
        raise CliError(f"no row to export: {stats.streams} stream(s), none with a supervised token under {args.view!r}")
    with user_errors():
        _write(rows_to_dataset(rows), out, args.format)
    print(f"dostream export: {len(rows)} rows → {out} ({args.format})", file=sys.stderr)
    return 0
