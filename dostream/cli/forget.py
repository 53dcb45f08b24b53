"""`dostream forget`: forget a source in a server's store: its streams, the memory's notes and counts
from them, and what the adapters learned from them (`serve/forget.py`).

    dostream forget --store DIR (--user ID | --conversation ID | --tenant T) [--tenant T] [--memory DIR]
                    [--model NAME] [--adapter DIR] [--key ID] [the --learn flags of `dostream serve`]

The adapter goes back to the version before the first update that could have read the source;
later updates are learned again without it, with the learning settings given here (give the ones
the server learned with: `--model`, `--adapter`, `--lora-r`, ...), each gated again. Prints the
record of the forgetting (JSON), which holds no forgotten content. A forget that was killed part
way, or whose WAL checkpoint did not complete, is finished first (`--resume-only`: only that).
"""

from __future__ import annotations

import argparse
import json
import sys

from dostream.cli._common import CliError, user_errors


def cli_main(argv: list[str]) -> int:
    from dostream.config import add_dataclass_args, from_args
    from dostream.serve.learn import LearnConfig

    ap = argparse.ArgumentParser(prog="dostream forget", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the server's store directory")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--user", help="forget every conversation whose requests carried this `user`")
    which.add_argument("--conversation", help="forget this conversation (its id, X-Conversation-Id)")
    ap.add_argument(
        "--tenant",
        help="alone: forget a tenant (its conversations, memory, adapters, snapshots; keys revoked); "
        "with --user/--conversation: that tenant's user or conversation only (default: every tenant's)",
    )
    which.add_argument(
        "--resume-only", action="store_true", help="only finish forgets killed part way (or not yet checkpointed)"
    )
    ap.add_argument("--memory", default=None, help="the server's --memory directory (its tenants' memories under it)")
    ap.add_argument("--model", default="smollm2", help="the served model (needed to replay updates)")
    ap.add_argument("--adapter", default=None, help="the server's --adapter (its version 0)")
    ap.add_argument("--key", default="cli", help="who asks, for the record (a key id; default: cli)")
    add_dataclass_args(ap.add_argument_group("learning settings the updates are replayed with"), LearnConfig)
    args = ap.parse_args(argv)
    given = [(k, getattr(args, k)) for k in ("user", "conversation") if getattr(args, k) is not None]
    if not given and args.tenant is not None:
        given = [("tenant", args.tenant)]
    if args.resume_only and args.tenant is not None:
        ap.error("--resume-only: not with --tenant")
    if not given and not args.resume_only:
        ap.error("give one source to forget: --user ID, --conversation ID or --tenant T (or --resume-only)")
    from pathlib import Path

    from dostream.serve import forget
    from dostream.serve.store import ServeStore, store_path

    if not store_path(args.store).exists():
        raise CliError(f"--store: no server store in {args.store} (no serve.sqlite)")
    with user_errors():
        learn = from_args(LearnConfig, args)
    start_adapter = None if args.adapter is None else Path(args.adapter)
    make_learner = _learner_factory(args.model, learn, start_adapter)
    done = []
    with user_errors():
        ids = forget.pending(args.store)
        if given:
            store = ServeStore.open_dir(args.store)
            try:
                ids.append(forget.start(store, given[0][0], given[0][1], args.key, args.tenant))
            finally:
                store.close()
        for fid in ids:
            done.append(
                forget.run(args.store, fid, memory=args.memory, start_adapter=start_adapter, make_learner=make_learner)
            )
    for record in done:
        print(json.dumps(record, sort_keys=True))
    if not done:
        print("dostream forget: nothing to do", file=sys.stderr)
    return 0


def _learner_factory(model: str, cfg, start_adapter):
    """`make_learner(slice, lineage)` for `serve.forget.replay`: loads the model on first use only."""
    loaded: dict = {}

    def make(piece, lineage):
        from dostream.models import load_model, load_tokenizer
        from dostream.serve.batcher import ModelSlot
        from dostream.serve.learn import Learner

        if "tok" not in loaded:
            loaded["tok"] = load_tokenizer(model)

        def load(adapter):
            return load_model(model, adapter=adapter, merge=adapter is not None)

        learner = Learner(
            cfg,
            model=model,
            store=piece,
            lineage=lineage,
            tok=loaded["tok"],
            slot=ModelSlot(None),
            load=load,
            fast_step=False,
        )
        learner.log = lambda line: print(line, file=sys.stderr)
        return learner

    return make
