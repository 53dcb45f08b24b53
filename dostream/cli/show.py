"""`dostream show FILE [--view V] [--tokenizer NAME] [--html OUT]`: who wrote each token, and is
it supervised?

The terminal view lists each rendered segment the way the seed paper does (`[LOSS]` supervised,
`[MASK]` masked), then the tokens themselves (supervised ones highlighted), then per-author token
counts and the supervised fraction. `--html OUT` writes the same as one standalone page: hover a
token to see its id, author and label.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections import Counter

from dostream.cli._common import user_errors, views_epilog
from dostream.cli.render import add_render_args, iter_rendered, print_report
from dostream.render import IGNORE, Rendered, RenderStats

AUTHOR_COLORS = {  # one colour per author, shared by the terminal and the page
    "agent": ("35", "#b04fc4"),
    "user": ("34", "#2f6fd0"),
    "teacher": ("36", "#118a8a"),
    "tool": ("33", "#a8740a"),
    "verifier": ("32", "#2e8b3a"),
    "oracle": ("32;1", "#1c6b27"),
    "environment": ("34", "#4a5fa8"),
    "protocol": ("37", "#6b6b6b"),
    "context": ("90", "#8a8a8a"),
}


def _visible(s: str) -> str:
    return s.replace("\n", "⏎\n").replace("\t", "⇥")


def _token_text(r: Rendered, i: int, tokenizer) -> str:
    o = r.offsets[i]
    # A token with no characters of its own (part of a multi-byte character) shows what it
    # decodes to alone, usually U+FFFD.
    return r.text[o[0] : o[1]] if o is not None else tokenizer.decode([r.input_ids[i]])


def summary(r: Rendered, labels: list[int]) -> tuple[Counter, Counter]:
    tokens = Counter(r.authors)
    supervised = Counter(a for a, label in zip(r.authors, labels) if label != IGNORE)
    return tokens, supervised


def terminal(r: Rendered, labels: list[int], tokenizer, color: bool) -> str:
    paint = (lambda code, s: f"\x1b[{code}m{s}\x1b[0m") if color else (lambda code, s: s)
    out = [paint("1", f"── stream {r.id} ── {len(r)} tokens")]
    # Paper-style listing: one line group per rendered segment.
    tok_start = 0
    for seg in r.segments:
        idx = [
            i
            for i in range(tok_start, len(r))
            if r.offsets[i] is not None and seg["start"] <= r.offsets[i][0] < seg["end"]
        ]
        sup = [labels[i] != IGNORE for i in idx]
        tag = "[LOSS]" if sup and all(sup) else "[MASK]" if not any(sup) else "[PART]"
        body = _visible(r.text[seg["start"] : seg["end"]]).rstrip("\n").replace("\n", "\n" + " " * 19)
        code = "32;1" if tag == "[LOSS]" else "90" if tag == "[MASK]" else "33"
        out.append(f"{paint(code, tag)} {seg['author']:<11} {paint(code if tag != '[MASK]' else '90', body)}")
    # Token view: every token, supervised ones highlighted.
    out.append(paint("1", "tokens (supervised highlighted, masked dim):"))
    line = []
    for i in range(len(r)):
        t = _visible(_token_text(r, i, tokenizer)).replace("\n", "")
        line.append(paint("42;30", t) if labels[i] != IGNORE else paint("2", t))
        line.append(paint("90", "│"))
    out.append("".join(line))
    tokens, supervised = summary(r, labels)
    out.append(paint("1", f"{'author':<12}{'tokens':>8}{'supervised':>12}"))
    for a, n in tokens.most_common():
        out.append(paint(AUTHOR_COLORS[a][0], f"{a:<12}") + f"{n:>8}{supervised[a]:>12}")
    n_sup = sum(supervised.values())
    out.append(f"{'total':<12}{len(r):>8}{n_sup:>12}   supervised fraction {n_sup / max(len(r), 1):.1%}")
    return "\n".join(out)


PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.stream{border:1px solid #ddd;border-radius:6px;padding:1em;margin-bottom:2em}
.toks{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;font-size:14px}
.t{border-bottom:3px solid;padding:1px 0;border-radius:2px;margin-right:2px}
.t.sup{background:#c9f0c9}.t.mask{background:#f2f2f2;opacity:.6}
.t:hover{outline:2px solid #333;opacity:1}
table{border-collapse:collapse;margin-top:1em}td,th{padding:2px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
.legend span{margin-right:1em;border-bottom:3px solid;padding:0 4px}
"""


def html_page(items: list[tuple[Rendered, list[int]]], tokenizer, title: str) -> str:
    legend = "".join(f'<span style="border-color:{c}">{a}</span>' for a, (_, c) in AUTHOR_COLORS.items())
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{PAGE_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p>Green background: supervised (in the loss). Grey: masked (context only). "
        "Underline colour: author. Hover a token for its id, author and label.</p>",
        f"<p class='legend'>{legend}</p>",
    ]
    for r, labels in items:
        toks = []
        for i in range(len(r)):
            a, label = r.authors[i], labels[i]
            tip = f"id {r.input_ids[i]} · author {a} · label {label}"
            cls = "sup" if label != IGNORE else "mask"
            toks.append(
                f'<span class="t {cls}" style="border-color:{AUTHOR_COLORS[a][1]}" '
                f'title="{html.escape(tip)}">{html.escape(_token_text(r, i, tokenizer))}</span>'
            )
        tokens, supervised = summary(r, labels)
        rows = "".join(
            f"<tr><td style='color:{AUTHOR_COLORS[a][1]}'>{a}</td><td>{n}</td><td>{supervised[a]}</td></tr>"
            for a, n in tokens.most_common()
        )
        n_sup = sum(supervised.values())
        parts.append(
            f"<div class='stream'><h2>{html.escape(r.id)}</h2><div class='toks'>{''.join(toks)}</div>"
            f"<table><tr><th>author</th><th>tokens</th><th>supervised</th></tr>{rows}"
            f"<tr><th>total</th><th>{len(r)}</th><th>{n_sup} ({n_sup / max(len(r), 1):.1%})</th></tr>"
            "</table></div>"
        )
    parts.append("</body></html>")
    return "".join(parts)


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dostream show",
        description=__doc__.split("\n\n")[0],
        epilog=views_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_render_args(p)
    p.add_argument("--html", default=None, metavar="OUT", help="also write a standalone HTML page to OUT")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="terminal colours")
    args = p.parse_args(argv)
    from dostream.models import load_tokenizer

    with user_errors():
        tokenizer = load_tokenizer(args.tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    stats = RenderStats()
    items = []
    for r in iter_rendered(args, tokenizer, stats):
        labels = r.labels(args.view)
        print(terminal(r, labels, tokenizer, color) + "\n")
        if args.html:  # only the page needs them all at once; the terminal view streams
            items.append((r, labels))
    if stats.dropped_no_supervised:
        print(f"dropped {stats.dropped_no_supervised} stream(s) with no supervised token", file=sys.stderr)
    print_report("show", stats, args.view)
    if args.html:
        page = html_page(items, tokenizer, f"dostream show: {os.path.basename(args.file)} · view {args.view}")
        with user_errors():
            os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(page)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
