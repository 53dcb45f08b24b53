"""`dostream report DIR`: rebuild a reproduction's report (Markdown, figures, results.json) from
the run directory's files. The experiment is read from `DIR/config.json`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# experiment name (config.json "experiment") -> module with `write_report(out) -> Path`
REPORTS = {"stem": "dostream.experiments.stem.report", "agent": "dostream.agent.report"}


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dostream report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a run directory written by `dostream reproduce ...` or `dostream agent run`")
    args = ap.parse_args(argv)
    record = Path(args.dir) / "config.json"
    if not record.exists():
        print(f"dostream report: {record} not found: is {args.dir} a run directory?", file=sys.stderr)
        return 2
    name = json.loads(record.read_text()).get("experiment")
    if name not in REPORTS:
        print(f"dostream report: {args.dir} is a {name!r} run; reports exist for {', '.join(REPORTS)}", file=sys.stderr)
        return 2
    print(importlib.import_module(REPORTS[name]).write_report(args.dir))
    return 0
