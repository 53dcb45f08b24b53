"""`dostream train STREAMS.jsonl --model NAME --view V --out DIR [--resume]`: train on your own logs.

Renders the streams (exactly as `dostream render` does), drops and counts rows with no supervised
token, and trains a LoRA adapter (or every weight) with the masked loss. The run directory gets
`config.json` (resolved config, versions, git commit, render statistics), `metrics.jsonl`,
`checkpoints/` and the final `adapter/` (loadable with `PeftModel.from_pretrained`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from dostream.cli._common import (
    CliError,
    add_stream_input_args,
    skipped_summary,
    stream_role_map,
    user_errors,
    views_epilog,
)
from dostream.config import add_dataclass_args, from_args
from dostream.train import TrainConfig, train


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dostream train",
        description=__doc__.split("\n\n")[0],
        epilog=views_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("streams", help="stream file (JSONL, segments or chat form)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    add_stream_input_args(p)
    add_dataclass_args(p, TrainConfig)
    args = p.parse_args(argv)

    from dostream.cli.render import print_report
    from dostream.models import load_tokenizer
    from dostream.render import Renderer, encode_rows
    from dostream.stream import read_streams, view_authors

    errors: list = []
    with user_errors():
        cfg = from_args(TrainConfig, args)
        view_authors(cfg.view)
        tok = load_tokenizer(cfg.model)
        streams = read_streams(
            args.streams, skip_invalid=args.skip_invalid, role_map=stream_role_map(args.role_map), errors=errors
        )
        rows, stats = encode_rows(
            streams,
            Renderer(tok, chat_template=cfg.chat_template),
            cfg.view,
            max_length=cfg.max_length,
            truncation_side=cfg.truncation_side,
        )
    if errors:
        print(f"dostream train: {skipped_summary(errors, stats.streams)}", file=sys.stderr)
        if not stats.streams:
            raise CliError(f"no stream was read from {args.streams}: {skipped_summary(errors, 0)}")
    print(
        f"dostream train: {stats.rows} rows from {stats.streams} streams ({stats.truncated} truncated, "
        f"{stats.dropped_no_supervised} dropped with no supervised token); {stats.supervised_tokens} of "
        f"{stats.tokens} tokens supervised ({stats.supervised_frac:.1%}) under view {cfg.view!r}",
        file=sys.stderr,
    )
    print_report("train", stats, cfg.view)
    if not stats.rows:  # train() would refuse too, without the file's name
        raise CliError(
            f"no training rows in {args.streams}: every stream was empty or had no supervised token under "
            f"view {cfg.view!r} ({stats.streams} stream(s) read, {stats.dropped_no_supervised} with no supervised token)"
        )
    with user_errors():
        result = train(
            rows,
            cfg,
            args.out,
            pad_id=tok.pad_token_id,
            resume=args.resume,
            extra_record={"render_stats": asdict(stats), "streams": args.streams},
        )
    last = result.metrics[-1] if result.metrics else {}
    print(
        f"dostream train: {result.steps} steps, final loss {last.get('train/loss', float('nan')):.4f}; "
        f"weights in {result.out}",
        file=sys.stderr,
    )
    return 0
