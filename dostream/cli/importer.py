"""`dostream import FILE... --out OUT.jsonl [--assistant self|other]`: transcript files → streams.

Reads JSON Lines, JSON arrays and single JSON documents (incrementally), in the OpenAI chat,
ShareGPT, Alpaca, TRL or dostream format (`--format auto` tells per record), and writes one
stream per conversation with a stable id. Tool calls become segments of the assistant turn that
made them, the tool list a preamble after the system prompt (docs/design.md, "Tool calls").

Provenance is a decision: were the assistant turns sampled by the model you are about to train
(`--assistant self`: author agent, masked under the interventional view) or written by another
model or a person (`--assistant other`: author teacher, supervised)? Without the flag the import
stops and asks, unless the data says it: a message's own `author`, `weight` (0: context only) or
sampled `token_ids` (agent) wins. `--role-map` follows the same rule: `assistant=teacher` assigns
an author to a role as --assistant does, `gpt=assistant` renames a role. Simulated users stay
`user`, tool outputs `tool`, system prompts `context`.

The output is written atomically and only when the import succeeds; a summary (read, kept,
skipped by reason, tool calls, who wrote the assistant turns) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from dostream.cli._common import CliError, user_errors


def cli_main(argv: list[str]) -> int:
    from dostream.importers import FORMATS, ImportReport, import_streams, parse_role_map

    p = argparse.ArgumentParser(
        prog="dostream import",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="transcript files (JSONL, JSON array or JSON); - for stdin")
    p.add_argument("--out", required=True, help="the stream file to write (JSONL); - for stdout")
    p.add_argument("--format", default="auto", choices=FORMATS, help="the input format (default: told per record)")
    p.add_argument(
        "--assistant",
        choices=("self", "other"),
        default=None,
        help="who wrote the assistant turns: self (the model being trained: agent) or other (teacher)",
    )
    p.add_argument(
        "--role-map",
        default=None,
        help="ROLE=AUTHOR assigns an author to a role (assistant=teacher); ROLE=ROLE renames a role "
        "(gpt=assistant, observation=tool); comma-separated",
    )
    p.add_argument("--messages-key", default=None, help="where the message list is (a dotted path, e.g. data.traj)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad records (a summary counts them by reason)")
    p.add_argument("--dedupe", action="store_true", help="keep only the first record of each id (else: an error)")
    args = p.parse_args(argv)

    with user_errors():
        role_map = parse_role_map(args.role_map)
    report = ImportReport()
    streams = import_streams(
        args.files,
        fmt=args.format,
        assistant=args.assistant,
        role_map=role_map,
        messages_key=args.messages_key,
        skip_invalid=args.skip_invalid,
        dedupe=args.dedupe,
        report=report,
    )
    with user_errors():
        if args.out == "-":
            for s in streams:
                sys.stdout.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
        else:
            from dostream.config import atomic_open

            # Written to a temp file that replaces OUT only when every record went through.
            with atomic_open(args.out) as f:
                for s in streams:
                    f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
                if report.kept == 0:
                    raise CliError(f"nothing kept: {report.summary()}; {args.out} not written")
    print(f"dostream import: {report.summary()}; wrote {args.out}", file=sys.stderr)
    if report.kept == 0:
        raise CliError(f"nothing kept: {report.summary()}")
    return 0
