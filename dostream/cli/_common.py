"""What every subcommand shares: the one error convention.

A subcommand raises `CliError(message)` for anything the user can fix (a bad flag, a missing file,
a run directory that holds another run); `main` prints `dostream CMD: message` on stderr and exits
2. No traceback reaches the user for their own mistakes; a traceback means a bug in dostream.
"""

from __future__ import annotations


class CliError(Exception):
    """A user-fixable error: printed as `dostream CMD: message`, exit status 2."""

    status = 2
