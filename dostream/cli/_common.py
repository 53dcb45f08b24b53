"""What every subcommand shares: the one error convention and the stream-input options.

A subcommand raises `CliError(message)` for anything the user can fix (a bad flag, a missing file,
a run directory that holds another run); `main` prints `dostream CMD: message` on stderr and exits
2. The library signals the same mistakes with its own exceptions (`USER_ERRORS`); a subcommand
runs the library calls that can fail on user input inside `with user_errors():`, which turns them
into `CliError`. No traceback reaches the user for their own mistakes; a traceback means a bug in
dostream. (argparse's own usage errors keep argparse's form: usage line, exit 2.)

This module is imported by `main` for every command, so it imports nothing heavy.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


class CliError(Exception):
    """A user-fixable error: printed as `dostream CMD: message`, exit status 2."""

    status = 2


# The library's exceptions for mistakes in what the user gave it:
#   ValueError: bad input data and settings: `StreamError` (a bad stream line), `RenderError` and
#     `config.RunDirError` (a run directory that holds another run or config) are ValueErrors, as
#     are a config dataclass's `__post_init__` checks, an unknown view name (`stream.view_authors`)
#     and malformed JSON;
#   OSError: a file or directory the user named is missing or unreadable, or an unknown model name.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    return str(e)


@contextmanager
def user_errors(prefix: str = "") -> Iterator[None]:
    """Turn the library's `USER_ERRORS` raised inside the block into `CliError(prefix + message)`.

    >>> with user_errors(prefix="--view: "):
    ...     raise ValueError("unknown view 'robots'")
    Traceback (most recent call last):
    ...
    dostream.cli._common.CliError: --view: unknown view 'robots'
    """
    try:
        yield
    except USER_ERRORS as e:
        raise CliError(prefix + _message(e)) from e


def add_stream_input_args(p: argparse.ArgumentParser) -> None:
    """`--skip-invalid` and `--role-map`: how a command that reads a stream file reads it."""
    p.add_argument("--skip-invalid", action="store_true", help="report and skip bad lines instead of stopping")
    p.add_argument(
        "--role-map",
        default=None,
        help="role→author map for chat logs without authors, e.g. 'assistant=teacher,user=user' "
        "(merged over the default: system=context, user=user, assistant=agent, tool=tool)",
    )


def stream_role_map(spec: str | None) -> dict[str, str]:
    """`--role-map` for a stream file in chat form, parsed by `importers.parse_role_map` (the one
    grammar) and merged over `stream.DEFAULT_ROLE_MAP`. Here every target is an author: renaming a
    role (`gpt=assistant`) is `dostream import`'s. A mistake names the flag, not the data file.

    >>> stream_role_map("assistant=teacher")["assistant"]
    'teacher'
    """
    from dostream.importers import parse_role_map
    from dostream.stream import AUTHORS, DEFAULT_ROLE_MAP

    try:
        given = parse_role_map(spec)
    except ValueError as e:
        raise CliError(str(e)) from None
    for role, target in given.items():
        if target not in AUTHORS:
            raise CliError(
                f"--role-map: '{role}={target}': {target!r} is not an author (one of {', '.join(AUTHORS)}) "
                "(renaming a role is for dostream import --role-map)"
            )
    return {**DEFAULT_ROLE_MAP, **given}


def skipped_summary(errors: list, kept: int) -> str:
    """`--skip-invalid`'s closing line: how many lines were skipped, by reason (`StreamError`s)."""
    from collections import Counter

    reasons = Counter(e.what for e in errors)
    top = "; ".join(f"{n} × {r}" for r, n in reasons.most_common(5)) + ("; ..." if len(reasons) > 5 else "")
    return f"skipped {len(errors)} invalid line(s), kept {kept} ({top})"


def views_epilog() -> str:
    """The named views for a `--help` page (`stream.VIEWS`, with what each is for)."""
    from dostream.stream import VIEW_HELP, VIEWS

    width = max(map(len, VIEWS))
    rows = [
        f"  {name:<{width}}  {{{', '.join(sorted(VIEWS[name]))}}}\n  {'':<{width}}  {VIEW_HELP[name]}" for name in VIEWS
    ]
    return "named views (--view NAME; or a comma-separated author set):\n" + "\n".join(rows)
