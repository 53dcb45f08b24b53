"""Config dataclasses → command-line options, and run-directory records.

Every configurable piece of dostream is a dataclass whose fields carry a one-line help in
`field(metadata={"help": ...})`; the CLI is generated from it, so the two never drift apart.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class C:
...     lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
>>> import argparse; p = argparse.ArgumentParser(); add_dataclass_args(p, C)
>>> from_args(C, p.parse_args(["--lr", "3e-4"]))
C(lr=0.0003)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its one-line help."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (list, tuple):
            parser.add_argument(flag, nargs="+", type=args[0], default=default, help=f"{help_} (default: {default})")
            continue
        if args and type(None) in args:  # Optional[X]
            kind = next(a for a in args if a is not type(None))
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, default=default, choices=choices, help=f"{help_} (default: {default})")


def from_args(cls: type, args: argparse.Namespace, **overrides):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def environment() -> dict[str, Any]:
    """Library versions, machine and git commit: what a run directory records beside its config."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("dostream", "torch", "transformers", "peft", "accelerate", "trl", "vllm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "argv": sys.argv,
    }


def write_run_record(out: str | os.PathLike, config: Any, extra: dict | None = None) -> None:
    """`config.json` in the run directory: the resolved config and the environment."""
    record = {"config": dataclasses.asdict(config), "environment": environment(), **(extra or {})}
    atomic_write_text(Path(out) / "config.json", json.dumps(record, indent=2, default=str) + "\n")
