"""`dostream serve`: an OpenAI-compatible endpoint that records every conversation as a stream.

    dostream serve --model NAME [--adapter DIR] --store DIR [--host 127.0.0.1] [--port 8000]
                   [--learn [--learner L] [--update-every-tokens N] [--learn-threads T] [--control FILE] ...]
    dostream serve keys add|list|revoke --store DIR [--scopes chat,feedback,admin] [--name NAME]

Every exchange goes into DIR/serve.sqlite (what the model sampled: `agent`, exact ids; what the
client sent: by role); `dostream streams export DIR` writes the conversations as stream JSONL.
A key is needed: DOSTREAM_API_KEY (one admin key, quick start) or keys made with `keys add`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dostream.cli._common import CliError, user_errors


def _keys(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dostream serve keys", description="manage the server's API keys")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="make a key (printed once; only its hash is stored)")
    add.add_argument("--store", required=True, help="the server's store directory")
    add.add_argument("--scopes", default="chat,feedback", help="comma-separated: chat, feedback, admin")
    add.add_argument("--name", default="", help="a label for the key")
    ls = sub.add_parser("list", help="list keys (ids, names, scopes, revoked or not)")
    ls.add_argument("--store", required=True)
    rv = sub.add_parser("revoke", help="revoke a key by its id")
    rv.add_argument("id", help="the key's id (key-...), as `keys list` shows it")
    rv.add_argument("--store", required=True)
    args = ap.parse_args(argv)
    from dostream.serve.store import ServeStore

    store = ServeStore.open_dir(args.store)
    try:
        if args.cmd == "add":
            scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
            with user_errors("--scopes: "):
                kid, key = store.add_key(args.name, scopes)
            print(key)
            print(
                f"dostream serve keys: {kid} ({','.join(scopes)}) added; the key above is shown once", file=sys.stderr
            )
        elif args.cmd == "list":
            for k in store.keys():
                state = (
                    "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(k["revoked"]))
                    if k["revoked"]
                    else "live"
                )
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created"]))
                print(f"{k['id']}\t{k['scopes']}\t{state}\t{made}\t{k['name']}")
        elif not store.revoke_key(args.id):
            raise CliError(f"no live key {args.id!r} in {args.store} (see `dostream serve keys list`)")
        else:
            print(f"dostream serve keys: {args.id} revoked", file=sys.stderr)
    finally:
        store.close()
    return 0


def cli_main(argv: list[str]) -> int:
    if argv[:1] == ["keys"]:
        return _keys(argv[1:])
    from dostream.config import add_dataclass_args, from_args
    from dostream.serve.config import Limits, ServeConfig
    from dostream.serve.learn import LearnConfig, read_control

    ap = argparse.ArgumentParser(
        prog="dostream serve",
        description=__doc__.split("\n\n")[0],
        epilog="`dostream serve keys --help`: manage API keys. Docs: docs/serving.md.",
    )
    # Every flag is a field of ServeConfig, Limits or LearnConfig (`config.opt`): one declaration.
    add_dataclass_args(ap, ServeConfig, skip=("limits", "learn"))
    add_dataclass_args(ap.add_argument_group("limits of a request"), Limits, skip=("max_stop",))
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ap.add_argument(
        "--learn",
        action="store_true",
        help="learn while serving: updates, a gate, hot swap (docs/serving.md, 'Learning while serving')",
    )
    add_dataclass_args(ap.add_argument_group("learning while serving (with --learn)"), LearnConfig)
    args = ap.parse_args(argv)
    if args.store is None:
        ap.error("the following arguments are required: --store")
    from dostream.serve.app import serve

    with user_errors():
        learn = from_args(LearnConfig, args)
        changed = [f for f in vars(learn) if getattr(learn, f) != getattr(LearnConfig(), f)]
        if not args.learn and changed:
            raise CliError(f"--{changed[0].replace('_', '-')} takes effect with --learn only")
        if args.learn and learn.control:
            read_control(learn.control)  # a bad control set is refused before the model loads

    with user_errors():
        limits = from_args(Limits, args)
        limits.default_max_tokens = min(limits.default_max_tokens, limits.max_tokens)
        cfg = from_args(ServeConfig, args, limits=limits, learn=learn if args.learn else None)
        serve(cfg, env_key=os.environ.get("DOSTREAM_API_KEY") or None, log_level=args.log_level)
    return 0
