"""`dostream report DIR`: rebuild a run's report (Markdown, figures, results.json) from the run
directory's files. The experiment is read from `DIR/config.json` (every run record names it)."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from dostream.cli._common import CliError
from dostream.config import RunDirError

# experiment name (config.json "experiment") -> module with `write_report(out) -> Path`
REPORTS = {
    "stem": "dostream.experiments.stem.report",
    "delusion": "dostream.experiments.delusion.report",
    "dual-lora": "dostream.experiments.dual_lora.report",
    "agent": "dostream.agent.report",
}


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dostream report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a run directory written by `dostream reproduce ...` or `dostream agent run`")
    args = ap.parse_args(argv)
    record = Path(args.dir) / "config.json"
    if not record.exists():
        raise CliError(f"{record} not found: is {args.dir} a run directory?")
    try:
        name = json.loads(record.read_text()).get("experiment")
    except json.JSONDecodeError as e:
        raise CliError(f"{record}: not a run record ({e})") from e
    if name not in REPORTS:
        raise CliError(f"{args.dir} is a {name!r} run; reports exist for {', '.join(REPORTS)}")
    try:
        print(importlib.import_module(REPORTS[name]).write_report(args.dir))
    except RunDirError as e:
        raise CliError(str(e)) from e
    return 0
