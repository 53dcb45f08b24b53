"""`dostream render FILE --tokenizer NAME --view V [--max-length N]`: one JSON object per stream.

The printed fields are a public contract (docs/design.md): `id`, `text`, `input_ids`, `labels`,
`offsets`, `authors`, `segments`. Streams left with no supervised token after truncation are
dropped and counted on stderr, as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from dostream.cli._common import (
    CliError,
    add_stream_input_args,
    skipped_summary,
    stream_role_map,
    user_errors,
    views_epilog,
)
from dostream.config import add_dataclass_args
from dostream.render import RenderBlock, Rendered, Renderer, RenderStats, render_rows
from dostream.stream import StreamError, read_streams, view_authors


def add_render_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `render`, `show` and `export`: the file, the tokenizer, `RenderBlock`'s and how to read the file."""
    p.add_argument("file", help="stream file (JSONL, segments or chat form); - for stdin")
    p.add_argument("--tokenizer", default="smollm2", help="tokenizer NAME: smollm2 (default), an HF id or a local path")
    add_dataclass_args(p, RenderBlock)
    add_stream_input_args(p)


def iter_rendered(args: argparse.Namespace, tokenizer, stats: RenderStats) -> Iterator[Rendered]:
    """Render the file's streams per the shared options, dropping (and counting in `stats`) the
    ones left with no supervised token. Bad input raises `CliError`; with `--skip-invalid`, a file
    of which no line could be read does too (after the summary of what was skipped)."""
    with user_errors(prefix="--view: "):
        view = view_authors(args.view)
    renderer = Renderer(tokenizer, chat_template=args.chat_template)
    errors: list[StreamError] = []
    streams = read_streams(
        args.file, skip_invalid=args.skip_invalid, role_map=stream_role_map(args.role_map), errors=errors
    )

    def dropped(sid: str) -> None:
        print(f"dostream: stream {sid!r} has no supervised token under this view: dropped", file=sys.stderr)

    with user_errors():
        for r, _ in render_rows(
            streams,
            renderer,
            view,
            max_length=args.max_length,
            truncation_side=args.truncation_side,
            stats=stats,
            on_drop=dropped,
        ):
            yield r
    if errors:
        print(f"dostream: {skipped_summary(errors, stats.streams)}", file=sys.stderr)
        if not stats.streams:
            raise CliError(f"no stream was read from {args.file}: {skipped_summary(errors, 0)}")


def print_report(cmd: str, stats: RenderStats, view: str) -> None:
    """The per-author split of supervised tokens and the warnings (`RenderStats.report`), on stderr."""
    for line in stats.report(view):
        print(f"dostream {cmd}: {line}", file=sys.stderr)


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dostream render",
        description=__doc__.split("\n\n")[0],
        epilog=views_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_render_args(p)
    args = p.parse_args(argv)
    from dostream.models import load_tokenizer

    with user_errors():
        tokenizer = load_tokenizer(args.tokenizer)
    stats = RenderStats()
    for r in iter_rendered(args, tokenizer, stats):
        sys.stdout.write(json.dumps(r.to_json(args.view), ensure_ascii=False) + "\n")
    if stats.dropped_no_supervised or stats.truncated:
        counts = {"truncated": stats.truncated, "dropped_no_supervised": stats.dropped_no_supervised}
        print(f"dostream render: {json.dumps({**counts, 'rendered': stats.rows})}", file=sys.stderr)
    print_report("render", stats, args.view)
    return 0
