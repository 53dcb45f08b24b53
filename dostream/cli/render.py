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

from dostream.cli._common import add_stream_input_args, parse_role_map, user_errors, views_epilog
from dostream.render import Rendered, Renderer
from dostream.stream import VIEWS, read_streams, view_authors


def add_render_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `render` and `show`."""
    p.add_argument("file", help="stream file (JSONL, segments or chat form); - for stdin")
    p.add_argument("--tokenizer", default="smollm2", help="tokenizer NAME: smollm2 (default), an HF id or a local path")
    p.add_argument(
        "--view",
        default="interventional",
        help=f"a view name ({', '.join(VIEWS)}; default interventional) or a comma-separated author set",
    )
    p.add_argument("--max-length", type=int, default=None, help="truncate each stream to this many tokens")
    p.add_argument(
        "--truncation-side",
        choices=("left", "right"),
        default="left",
        help="left (default) keeps the most recent tokens; right keeps the first ones",
    )
    p.add_argument("--chat-template", action="store_true", help="render with the tokenizer's chat template")
    add_stream_input_args(p)


def iter_rendered(args: argparse.Namespace, tokenizer, stats: dict[str, int]) -> Iterator[Rendered]:
    """Render the file's streams per the shared options, dropping (and counting in `stats`) the
    ones left with no supervised token. Bad input raises `CliError`."""
    with user_errors(prefix="--view: "):
        view = view_authors(args.view)
    renderer = Renderer(tokenizer, chat_template=args.chat_template)
    streams = read_streams(args.file, skip_invalid=args.skip_invalid, role_map=parse_role_map(args.role_map))
    with user_errors():
        for stream in streams:
            r = renderer.render(stream)
            if args.max_length is not None:
                if len(r) > args.max_length:
                    stats["truncated"] = stats.get("truncated", 0) + 1
                r = r.truncate(args.max_length, args.truncation_side)
            if not any(r.supervised(view)):
                stats["dropped_no_supervised"] = stats.get("dropped_no_supervised", 0) + 1
                print(f"dostream: stream {r.id!r} has no supervised token under this view: dropped", file=sys.stderr)
                continue
            stats["rendered"] = stats.get("rendered", 0) + 1
            yield r


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
    stats: dict[str, int] = {}
    for r in iter_rendered(args, tokenizer, stats):
        sys.stdout.write(json.dumps(r.to_json(args.view), ensure_ascii=False) + "\n")
    if stats.get("dropped_no_supervised") or stats.get("truncated"):
        print(f"dostream render: {json.dumps(stats)}", file=sys.stderr)
    return 0
