"""`dostream memory distill|list|show|query|forget|consolidate`: notes the world taught, with their evidence.

A memory is `DIR/memory.sqlite` (`dostream.memory.store`), beside a stream store.

* `distill STREAMS.jsonl... --memory DIR --model NAME` (also `build STREAMS.jsonl... --out DIR`): cases from the streams' world-authored
  segments become extractive notes, and (`--writer local|endpoint`) clusters of cases abstractive
  ones; each is admitted only if it raises the likelihood of world tokens it was not written from
  (`memory/admit.py`). Every stream file is read whole before anything is opened or loaded: a bad
  line is an error naming the file, the line and the field, and the memory is not touched.
* `consolidate DIR --model NAME`: one update of the adapter on the notes' cited world segments,
  through the learning cycle (`memory/consolidate.py`), gated on what survives with the memory
  removed; every `UpdateConfig` field is a flag.
* `list DIR`: the active notes (`--all`: tombstones too); `show DIR NOTE`: one note, its evidence,
  situations, counters and admission record; `query DIR "TEXT"`: the notes retrieval would put in
  a prompt for that situation, with their evidence; `forget DIR --stream ID|--user U|--key K`:
  every note and count from that source (see `memory/store.py`).

`list`, `show` and `query` open the memory read-only; `--json` prints JSON instead of text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dostream.cli._common import CliError, add_stream_input_args, skipped_summary, stream_role_map, user_errors
from dostream.config import add_dataclass_args, from_args


def build_parser() -> argparse.ArgumentParser:
    from dostream.learning.config import UpdateConfig
    from dostream.memory.distill import DistillConfig

    ap = argparse.ArgumentParser(prog="dostream memory", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distill", aliases=["build"], help="distil notes from stream files into a memory (alias: build)")
    d.add_argument("streams", nargs="+", help="stream JSONL files (dostream's format; `-` for stdin)")
    d.add_argument(
        "--memory",
        "--out",
        dest="memory",
        required=True,
        help="the memory's directory (DIR/memory.sqlite; made if missing)",
    )
    d.add_argument("--model", default="smollm2", help="the model whose likelihoods admit notes (default smollm2)")
    d.add_argument("--adapter", default=None, help="a PEFT adapter directory to load on top of the model")
    d.add_argument("--chat-template", action="store_true", help="render streams in the tokenizer's chat template")
    d.add_argument(
        "--writer",
        choices=("none", "local", "endpoint"),
        default="none",
        help="who writes abstractive notes: none (extractive only), local (--model), endpoint (--writer-url)",
    )
    d.add_argument("--writer-url", default=None, help="an OpenAI-compatible base URL (e.g. http://host:8000/v1)")
    d.add_argument("--writer-model", default=None, help="the endpoint's model name")
    d.add_argument(
        "--writer-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's API key"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_stream_input_args(d)
    add_dataclass_args(d, DistillConfig)
    for name, what in (("list", "the notes of a memory"), ("show", "one note with its evidence")):
        p = sub.add_parser(name, help=what)
        p.add_argument("memory", help="the memory's directory")
        if name == "show":
            p.add_argument("note", type=int, help="the note's id")
        else:
            p.add_argument("--all", action="store_true", help="superseded and forgotten tombstones too")
        p.add_argument("--json", action="store_true", help="JSON instead of text")
    c = sub.add_parser("consolidate", help="one gated update of the adapter on the notes' cited world segments")
    c.add_argument("memory", help="the memory's directory (its versions and adapters live there)")
    c.add_argument("--model", default="smollm2", help="the base model (default smollm2)")
    c.add_argument("--adapter", default=None, help="the adapter the first consolidation starts from (default: none)")
    add_dataclass_args(c, UpdateConfig)
    q = sub.add_parser("query", help="the notes retrieval would put in a prompt for a situation")
    q.add_argument("memory", help="the memory's directory")
    q.add_argument("situation", help="the current situation's text")
    q.add_argument("-k", type=int, default=4, help="how many notes (default 4)")
    q.add_argument("--json", action="store_true", help="JSON instead of text")
    f = sub.add_parser("forget", help="remove every note and count that came from one source")
    f.add_argument("memory", help="the memory's directory")
    who = f.add_mutually_exclusive_group(required=True)
    who.add_argument("--stream", "--source", dest="stream", help="a stream id (--source: the same)")
    who.add_argument("--user", help="a user (a stream's meta.user)")
    who.add_argument("--key", help="an API key id (a stream's meta.api_key)")
    return ap


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd in ("distill", "build"):
        return _distill(args)
    if args.cmd == "consolidate":
        return _consolidate(args)
    from dostream.memory.store import Memory

    store = Path(args.memory) / "memory.sqlite"
    if not store.is_file():
        raise CliError(f"{store}: no memory there (make one with `dostream memory distill ... --memory {args.memory}`)")
    with user_errors():
        memory = Memory(store, read_only=args.cmd != "forget")
    try:
        if args.cmd == "forget":
            with user_errors():
                gone = memory.forget(stream=args.stream, user=args.user, key=args.key)
            print(f"dostream memory forget: {len(gone)} note(s) forgotten: {gone}", file=sys.stderr)
        elif args.cmd == "list":
            notes = memory.notes(None if args.all else "active")
            _print([n.to_json() for n in notes] if args.json else [_line(n) for n in notes], args.json)
        elif args.cmd == "show":
            try:
                note = memory.note(args.note)
            except KeyError:
                raise CliError(f"{store}: no note {args.note}") from None
            _print([note.to_json()] if args.json else [_detail(note)], args.json)
        else:
            from dostream.memory.retrieve import retrieve

            notes = retrieve(memory, args.situation, args.k)
            _print([n.to_json() for n in notes] if args.json else [_detail(n) for n in notes], args.json)
    finally:
        memory.close()
    return 0


def _distill(args: argparse.Namespace) -> int:
    from dostream.memory.distill import DistillConfig
    from dostream.stream import read_streams

    if args.writer == "endpoint" and not (args.writer_url and args.writer_model):
        raise CliError("--writer endpoint needs --writer-url and --writer-model")
    if args.writer != "endpoint" and (args.writer_url or args.writer_model):
        raise CliError("--writer-url and --writer-model take effect with --writer endpoint only")
    with user_errors():
        config = from_args(DistillConfig, args)
    role_map = stream_role_map(args.role_map)
    streams, errors = [], []
    for path in args.streams:
        with user_errors():  # a bad line: the file, the line and the field; nothing opened yet
            streams += list(read_streams(path, skip_invalid=args.skip_invalid, role_map=role_map, errors=errors))
    if errors:
        print(f"dostream memory distill: {skipped_summary(errors, len(streams))}", file=sys.stderr)
    if not streams:
        raise CliError("no streams to distil")

    from dostream.memory.distill import CITED, distill
    from dostream.memory.store import Memory
    from dostream.memory.writer import EndpointWriter, LocalWriter
    from dostream.models import load_model, load_tokenizer
    from dostream.render import Renderer

    with user_errors():
        tok = load_tokenizer(args.model)
        renderer = Renderer(tok, chat_template=args.chat_template)
        model = load_model(args.model, adapter=args.adapter, merge=True)
        writer = None
        if args.writer == "local":
            writer = LocalWriter(model, tok)
        elif args.writer == "endpoint":
            writer = EndpointWriter(args.writer_url, args.writer_model, api_key=os.environ.get(args.writer_key_env))
        memory = Memory.open_dir(args.memory)
    try:
        with user_errors():
            records = distill(streams, memory, model, renderer, config, writer=writer, progress=not args.no_progress)
    finally:
        memory.close()
    cited = sum(r["admission"].get("reason") == CITED for r in records)
    stored = sum(r["note"] is not None for r in records) - cited
    print(
        f"dostream memory distill: {len(streams)} streams, {len(records) - cited} candidates tested, "
        f"{stored} new notes stored in {args.memory}, {cited} known notes cited again",
        file=sys.stderr,
    )
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from dostream.learning.config import UpdateConfig
    from dostream.memory.consolidate import MemorySource, consolidate
    from dostream.memory.store import Memory
    from dostream.models import load_tokenizer

    store = Path(args.memory) / "memory.sqlite"
    if not store.is_file():
        raise CliError(f"{store}: no memory there (make one with `dostream memory distill ... --memory {args.memory}`)")
    with user_errors():
        cfg = from_args(UpdateConfig, args)
        tok = load_tokenizer(args.model)
        memory = Memory(store)
    try:
        with user_errors():
            done = consolidate(MemorySource(memory, args.memory, args.model, tok, start=args.adapter), cfg)
    finally:
        memory.close()
    if done is None:
        print("dostream memory consolidate: no note is new since the last consolidation", file=sys.stderr)
    else:
        verdict = "accepted" if done.accepted else "REJECTED"
        print(f"dostream memory consolidate: version {done.version} {verdict}: {done.reason}", file=sys.stderr)
    return 0


def _print(items: list, as_json: bool) -> None:
    for item in items:
        print(json.dumps(item, ensure_ascii=False) if as_json else item)


def _line(note) -> str:
    c = note.counters
    return (
        f"{note.id:>5}  {note.status:<10} {note.kind:<11} supported {c['supported']} contradicted {c['contradicted']} "
        f"used {c['used']} helped {c['helped']}  {note.text[:80]!r}"
    )


def _detail(note) -> str:
    lines = [_line(note)]
    if note.superseded_by is not None:
        lines.append(f"  superseded by note {note.superseded_by}")
    if note.admission:
        lines.append(f"  admission: {note.admission.get('reason', '')}")
    for link in note.evidence + note.situation:
        where = f"{link.stream} segment {link.segment} [{link.start}:{link.end}] {link.author}"
        lines.append(f"  {link.kind:<9} {where}: {link.quote[:100]!r}")
    return "\n".join(lines)
