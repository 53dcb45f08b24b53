"""Files that are whole or absent: atomic writes of a file or a directory. Knows nothing of what is written.

A reader sees the old content or the new, never half of it; a killed writer leaves the old one.

>>> import tempfile; d = Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "a.txt", "new"); (d / "a.txt").read_text()
'new'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

# The process's umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[TextIO]:
    """Open `path` for writing (text, UTF-8) so that readers see the old content or the new, never
    half of it: the writes go to a temp file beside it, which replaces `path` (fsynced, renamed)
    when the block ends, and is removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a written result gets the mode a plain open() would give it.
        os.chmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    with atomic_open(path) as f:
        f.write(text)


def replace_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` builds a directory under a temp name beside `target`, which is then renamed into
    place (an old `target` moved aside first, removed after): a killed write never leaves a
    half-written checkpoint or adapter behind. (The same rule for a file: `atomic_open`.)"""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
