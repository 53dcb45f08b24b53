"""`dostream serve`: an OpenAI-compatible endpoint that records every conversation as a stream.

    dostream serve --model NAME [--adapter DIR] --store DIR [--host 127.0.0.1] [--port 8000]
                   [--learn [--learner L] [--update-every-tokens N] [--learn-threads T] [--control FILE] ...]
    dostream serve keys add|list|revoke --store DIR [--scopes chat,feedback,admin] [--name NAME] [--tenant T]
    dostream serve tenants list|show|rollback|set --store DIR [NAME] [--snapshot K] [--context TEXT]

Every exchange goes into DIR/serve.sqlite (what the model sampled: `agent`, exact ids; what the
client sent: by role); `dostream streams export DIR` writes the conversations as stream JSONL.
A key is needed: DOSTREAM_API_KEY (one admin key, quick start) or keys made with `keys add`.
"""

from __future__ import annotations

import argparse
import json
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
    add.add_argument(
        "--tenant", default=None, help="the tenant the key belongs to (made if new); none: the default tenant"
    )
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
            if args.tenant is not None:
                from dostream.serve.keys import check_tenant_name

                with user_errors("--"):  # "--tenant: expected ..."
                    check_tenant_name(args.tenant)
            with user_errors("--scopes: "):
                kid, key = store.add_key(args.name, scopes, args.tenant)
            print(key)
            whose = "" if args.tenant is None else f" of tenant {args.tenant}"
            print(
                f"dostream serve keys: {kid} ({','.join(scopes)}){whose} added; the key above is shown once",
                file=sys.stderr,
            )
        elif args.cmd == "list":
            for k in store.keys():
                state = (
                    "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(k["revoked"]))
                    if k["revoked"]
                    else "live"
                )
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created"]))
                print(f"{k['id']}\t{k['scopes']}\t{k['tenant'] or 'default'}\t{state}\t{made}\t{k['name']}")
        elif not store.revoke_key(args.id):
            raise CliError(f"no live key {args.id!r} in {args.store} (see `dostream serve keys list`)")
        else:
            print(f"dostream serve keys: {args.id} revoked", file=sys.stderr)
    finally:
        store.close()
    return 0


def _tenants(argv: list[str]) -> int:
    """The store's side of tenants (no model loaded): a rollback or context set here is in force at
    the server's next start; against a running server use `POST /v1/tenants/{t}/rollback`."""
    ap = argparse.ArgumentParser(prog="dostream serve tenants", description="the server's tenants")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the tenants, their adapter version and conversations").add_argument(
        "--store", required=True
    )
    show = sub.add_parser("show", help="one tenant: context, adapter, memory, keys, snapshots (JSON)")
    rb = sub.add_parser(
        "rollback", help="put a tenant's earlier snapshot back (adapter version, context; memory with --memory)"
    )
    st = sub.add_parser("set", help="set a tenant's system context (a new snapshot)")
    for p in (show, rb, st):
        p.add_argument("name", help="the tenant")
        p.add_argument("--store", required=True)
        p.add_argument("--memory", default=None, help="the server's --memory directory")
    rb.add_argument("--snapshot", type=int, default=None, help="its id (default: the one before the newest)")
    st.add_argument("--context", required=True, help="the system context ('' for none)")
    args = ap.parse_args(argv)
    from dostream.serve import tenants as t
    from dostream.serve.learn import record_rollback, rollback_target
    from dostream.serve.store import ServeStore

    store = ServeStore.open_dir(args.store)
    try:
        names = store.tenants()
        name = getattr(args, "name", None)
        if name is not None and name not in names:
            raise CliError(f"no tenant {name!r} in {args.store} (see `dostream serve tenants list`)")
        mdir = t.memory_dir(getattr(args, "memory", None), name) if name else None

        def lineage(n: str):
            return t.lineage_of(args.store, n, None, store.versions)

        if args.cmd == "list":
            for n in names:
                _, version = lineage(n).versions.in_force()
                print(f"{n}\tversion {version}\t{len(store.conversations(n))} conversations")
        elif args.cmd == "show":
            print(json.dumps(t.describe(store, name, lineage(name), mdir), indent=2))
        elif args.cmd == "set":
            print(json.dumps(t.record_snapshot(store, name, lineage(name), mdir, "context set", args.context)))
        else:
            try:
                target = t.snapshot_target(store, name, args.snapshot)
                line = lineage(name)
                t.roll_back_memory(mdir, target, check=True)
                if target["version"] != line.versions.in_force()[1]:
                    version, adapter, now = rollback_target(line, target["version"])
                    record_rollback(line, version, adapter, now)
                memory = t.roll_back_memory(mdir, target)
            except (LookupError, ValueError) as e:
                raise CliError(f"--snapshot: {str(e).strip(chr(39))}") from None
            row = t.record_snapshot(store, name, line, mdir, f"rollback to snapshot {target['id']}", target["context"])
            print(json.dumps(t.rolled_back(row, target, memory)))
    finally:
        store.close()
    return 0


def cli_main(argv: list[str]) -> int:
    if argv[:1] == ["keys"]:
        return _keys(argv[1:])
    if argv[:1] == ["tenants"]:
        return _tenants(argv[1:])
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
