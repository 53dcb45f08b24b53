"""The `dostream` command.

This file only maps a name to the module `dostream/cli/<name>.py` and calls its `cli_main(argv)`
(imported lazily, so `dostream --help` stays fast and a subcommand pays only for what it uses).
A subcommand signals a user error with `CliError` (see `_common.py`); it is printed here as
`dostream CMD: message` on stderr, exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from dostream.cli._common import CliError
from dostream.openmp import openmp_defaults

# name -> (module, one-line help). Each module defines `cli_main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "dostream.cli.demo",
        "the rule at work on the embedded model in a few minutes: two adapters, one difference",
    ),
    "import": (
        "dostream.cli.importer",
        "transcript files (OpenAI, ShareGPT, Alpaca, TRL; JSONL or JSON) → streams, saying who wrote the assistant turns",
    ),
    "render": ("dostream.cli.render", "render streams to token ids, labels, offsets and authors (JSON lines)"),
    "show": ("dostream.cli.show", "show token by token who wrote what and what is supervised (terminal or --html)"),
    "train": ("dostream.cli.train", "train a LoRA adapter (or every weight) on streams under a view"),
    "export": (
        "dostream.cli.export",
        "streams → labelled rows for TRL: a Hugging Face dataset or Parquet (`--format`)",
    ),
    "sample": ("dostream.cli.sample", "sample from a model (exact token ids), e.g. for a quick look"),
    "stem": ("dostream.cli.stem", "STEM problems: `stem generate`, `stem verify`"),
    "reproduce": (
        "dostream.cli.reproduce",
        "rerun a seed experiment end to end: `reproduce stem`, `reproduce delusion`",
    ),
    "report": ("dostream.cli.report", "rebuild a reproduction's report from its run directory: `report DIR`"),
    "agent": ("dostream.cli.agent", "the continual agent: act, store, learn from the world's answers (`agent run`)"),
    "streams": ("dostream.cli.streams", "stored streams: `streams export RUN` writes a run's episodes as JSONL"),
    "serve": (
        "dostream.cli.serve",
        "an OpenAI-compatible endpoint that records every conversation as a stream (`serve`, `serve keys`)",
    ),
    "memory": (
        "dostream.cli.memory",
        "notes the world taught, with evidence: `memory distill|list|show|query|forget|consolidate`",
    ),
    "forget": (
        "dostream.cli.forget",
        "forget a source in a server's store (--user, --conversation, --tenant): streams, notes, what adapters learned",
    ),
    "theory": ("dostream.cli.theory", "exact Bayes under intervention, self-delusion and the prediction lemma"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dostream COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dostream COMMAND --help` describes one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "torch" not in sys.modules:  # OpenMP reads its environment when torch loads it (dostream/openmp.py)
        os.environ.update(openmp_defaults(os.environ))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from dostream import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"dostream: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return int(module.cli_main(argv[1:]) or 0)
    except CliError as e:
        print(f"dostream {argv[0]}: {e}", file=sys.stderr)
        return e.status
    except BrokenPipeError:
        # The reader went away (`dostream render ... | head`): stop quietly, as a Unix filter does.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter killed by the broken pipe


if __name__ == "__main__":
    sys.exit(main())
