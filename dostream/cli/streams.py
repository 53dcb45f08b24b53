"""`dostream streams export RUN [--out FILE]`: a continual agent's stored episodes as stream JSONL.

RUN is one loop's directory (it holds `store.sqlite`), or a `dostream serve --store` directory (it
holds `serve.sqlite`: one stream per conversation, see `serve/store.py`). The output is the stream
format every other command reads (`render`, `show`, `train`), agent token ids included, in episode
(or conversation) order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dostream.agent.store import Store
from dostream.cli._common import CliError, user_errors
from dostream.stream import write_streams


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dostream streams", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a run's stored episodes as stream JSONL")
    ex.add_argument("run", help="a loop's run directory (holding store.sqlite) or a server's store (serve.sqlite)")
    ex.add_argument("--out", default="-", help="output file (default: stdout)")
    ex.add_argument("--start", type=int, default=0, help="first episode (seq; a server's: conversation) to export")
    ex.add_argument("--stop", type=int, default=None, help="export episodes (conversations) before this one")
    args = ap.parse_args(argv)
    db = Path(args.run) / "store.sqlite"
    if not db.exists() and (Path(args.run) / "serve.sqlite").exists():
        from dostream.serve.store import ServeStore

        with user_errors():
            store = ServeStore.open_dir(args.run, read_only=True)
        read = store.export_streams
    elif db.exists():
        with user_errors():
            store = Store(db, read_only=True)
        read = store.episodes
    else:
        raise CliError(
            f"{db} not found: is {args.run} a loop's run directory (e.g. OUT/interventional) or a server's --store?"
        )
    try:
        with user_errors():  # a damaged row: the store file, the row and the field
            streams = read(args.start, args.stop)
    finally:
        store.close()
    with user_errors():
        n = write_streams(args.out, streams)
    print(f"dostream streams export: {n} streams -> {args.out}", file=sys.stderr)
    return 0
