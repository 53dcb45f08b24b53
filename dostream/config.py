"""Config dataclasses → command-line options; config blocks; run-directory records and the guard.

Every configurable piece of dostream is a dataclass whose fields carry a one-line help in
`field(metadata={"help": ...})`; the CLI is generated from it, so the two never drift apart.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class C:
...     lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
>>> import argparse; p = argparse.ArgumentParser(); add_dataclass_args(p, C)
>>> from_args(C, p.parse_args(["--lr", "3e-4"]))
C(lr=0.0003)

Settings that several configs share live in one *block* (`LoraBlock`, `SupervisedBlock`); a config
composes a block by subclassing it, so its fields, flags and run record stay flat (`cfg.lr`,
`--lr`, `"lr"` in `config.json`), and changes one of the block's defaults with `like`.

A run directory holds one run: `config.json` (`write_run_record`) names its `experiment` and its
resolved config, and `check_run_dir` refuses to continue it with another config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Atomic writes live in `files.py`; imported here for the many modules that write run records.
from dostream.files import atomic_open, atomic_write_text  # noqa: F401


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its one-line help. `choices=`, and bounds `min=` / `max=` (inclusive)
    and `gt=` (exclusive), are checked on the command line (naming the flag) and by `check_config`
    (naming the field), which a config may call from its `__post_init__`."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def like(cls: type, name: str, default: Any) -> Any:
    """Field `name` of the dataclass `cls` (a block) with another default; its help stays.

    >>> @dataclass
    ... class Agentish(SupervisedBlock):
    ...     epochs: int = like(SupervisedBlock, "epochs", 2)
    >>> Agentish().epochs, Agentish().lr
    (2, 0.0002)
    """
    return opt(default, **cls.__dataclass_fields__[name].metadata)


# -- the shared blocks -------------------------------------------------------------------------


@dataclass
class LoraBlock:
    """LoRA and optimiser

    The settings every trainer shares: `train()`, GRPO, the agent, the reproductions."""

    lr: float = opt(2e-4, "learning rate (AdamW; the peak under a warm-up/decay schedule)", gt=0)
    lora_r: int = opt(16, "LoRA rank", min=1)
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r)", gt=0)


@dataclass
class SupervisedBlock(LoraBlock):
    """LoRA, optimiser and batches

    `LoraBlock` and the passes over the rows, rows per step and row length: every run of `train()`."""

    epochs: int = opt(1, "passes over the training rows", min=1)
    batch_size: int = opt(8, "rows per optimizer step (per micro-batch, with gradient accumulation)", min=1)
    # Also `render.RenderBlock`'s (there None by default: no truncation).
    max_length: int = opt(1024, "truncate each rendered stream (a training row) to this many tokens", min=2)


def block_values(config: Any, block: type) -> dict[str, Any]:
    """The values of `block`'s fields in `config` (which composes it): to hand them on as a whole,
    e.g. `TrainConfig(model=..., **block_values(preset, SupervisedBlock))`."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(block)}


# -- renamed fields ----------------------------------------------------------------------------

# A field's old name -> its new name and how the old values read (empty: as they are). For a config
# that has the new field and not the old one, the old name keeps working, deprecated: as a keyword
# and a read-only attribute (`keeps_old_names`), as a flag (`--bf16 on`), in `--set`, and in a run
# record written before the rename (`check_run_dir` reads it under the new name).
RENAMED_FIELDS: dict[str, tuple[str, dict[str, str]]] = {
    "bf16": ("precision", {"on": "bf16", "off": "fp32", "auto": "auto"}),  # the training configs' autocast switch
    "dtype": ("precision", {}),  # SamplingConfig's
}


def renamed_fields(cls: type) -> dict[str, tuple[str, dict[str, str]]]:
    """The entries of `RENAMED_FIELDS` that apply to the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {old: (new, v) for old, (new, v) in RENAMED_FIELDS.items() if new in names and old not in names}


def keeps_old_names(cls: type) -> type:
    """Class decorator (over `@dataclass`): `cls(old=value)` keeps working for its renamed fields
    (`RENAMED_FIELDS`), with a DeprecationWarning, and `config.old` reads the new field in the old
    spelling: `TrainConfig(bf16="on").precision == "bf16"`, `.bf16 == "on"`."""
    renames, init = renamed_fields(cls), cls.__init__

    def __init__(self, *args, **kwargs):
        for old in renames.keys() & kwargs.keys():
            new, values = renames[old]
            if new in kwargs:
                raise TypeError(f"{cls.__name__}: {old}= is the old name of {new}=; pass only {new}=")
            value = kwargs.pop(old)
            kwargs[new] = values.get(value, value) if isinstance(value, str) else value
            warnings.warn(f"{cls.__name__}({old}=) is deprecated: use {new}={kwargs[new]!r}", DeprecationWarning, 2)
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # inspect.signature shows the fields
    cls.__init__ = __init__
    for old, (new, values) in renames.items():
        back = {v: k for k, v in values.items()}
        setattr(cls, old, property(lambda self, new=new, back=back: back.get(getattr(self, new), getattr(self, new))))
    return cls


# -- dataclass -> command line -----------------------------------------------------------------


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), defaults: Any = None
) -> None:
    """One flag per field of `cls` (`lora_r` -> `--lora-r`), with its help, type, choices and
    default; `defaults` (an instance, e.g. a preset) supplies other defaults. The fields of the
    block `cls` composes are listed after its own, in a group of their own."""
    hints = typing.get_type_hints(cls)
    block = next((b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)), None)
    inherited = {f.name for f in dataclasses.fields(block)} if block else set()
    group = parser.add_argument_group(block.__doc__.strip().splitlines()[0]) if block else parser
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):  # stable: own fields first
        if f.name in skip:
            continue
        target = group if f.name in inherited else parser
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (list, tuple):
            target.add_argument(flag, nargs="+", type=args[0], default=default, help=f"{help_} (default: {default})")
            continue
        if args and type(None) in args:  # Optional[X]
            kind = next(a for a in args if a is not type(None))
        choices = f.metadata.get("choices")
        kind = _bounded(kind, f.metadata) if _BOUNDS & f.metadata.keys() else kind
        target.add_argument(flag, type=kind, default=default, choices=choices, help=f"{help_} (default: {default})")
    for old, (new, values) in renamed_fields(cls).items():
        if new not in skip:  # the old flag, kept working and kept out of --help
            choices = dict.fromkeys(values or cls.__dataclass_fields__[new].metadata.get("choices") or ())
            parser.add_argument(
                "--" + old.replace("_", "-"),
                dest=new,
                type=_old_flag(old, new, values, tuple(choices)),
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


_BOUNDS = {"min", "max", "gt"}


def _out_of_bounds(value: Any, meta: Any) -> str | None:
    """Why `value` breaks the field's bounds (`min`, `max`, `gt` in its metadata), or None."""
    if value is None:  # an optional field left unset (`max_length=None`: no truncation)
        return None
    if "min" in meta and value < meta["min"]:
        return f"must be >= {meta['min']}, got {value}"
    if "gt" in meta and value <= meta["gt"]:
        return f"must be > {meta['gt']}, got {value}"
    if "max" in meta and value > meta["max"]:
        return f"must be <= {meta['max']}, got {value}"
    return None


def _bounded(kind: type, meta: Any):
    """An argparse `type` that converts like `kind` and refuses values out of the field's bounds."""

    def convert(text: str):
        value = kind(text)
        why = _out_of_bounds(value, meta)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def _old_flag(old: str, new: str, values: dict[str, str], choices: tuple[str, ...]):
    """The argparse `type` of a renamed field's old flag: its value in the new spelling, and a note
    on stderr that the flag is deprecated."""

    def convert(text: str) -> str:
        if choices and text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        value = values.get(text, text)
        flag = "--" + new.replace("_", "-")
        print(f"dostream: --{old.replace('_', '-')} is deprecated: use {flag} {value}", file=sys.stderr)
        return value

    convert.__name__ = new
    return convert


def check_config(config: Any) -> None:
    """Raise ValueError naming the first field of `config` out of its bounds or choices (see `opt`).

    >>> @dataclass
    ... class C:
    ...     top_p: float = opt(1.0, "nucleus mass", gt=0, max=1)
    >>> check_config(C(top_p=0))
    Traceback (most recent call last):
    ValueError: top_p: must be > 0, got 0
    """
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        why = _out_of_bounds(value, meta) if _BOUNDS & meta.keys() else None
        if why is None and meta.get("choices") is not None and value not in meta["choices"]:
            why = f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
        if why:
            raise ValueError(f"{f.name}: {why}")


def from_args(cls: type, args: argparse.Namespace, **overrides):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    config = cls(**values)
    check_config(config)
    return config


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def set_argv(cls: type, items: Iterable[str]) -> list[str]:
    """`--set FIELD=VALUE` items as the generated flags they stand for, to be parsed (and checked)
    like them: `n_test=5` -> `--n-test=5`, `dapo=true` -> `--dapo`. Raises ValueError for an item
    that names no field of `cls`.

    >>> set_argv(SupervisedBlock, ["max_length=64", "lora-r=4"])
    ['--max-length=64', '--lora-r=4']
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    renames = renamed_fields(cls)
    argv: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in renames:  # an old name: `bf16=on` is `precision=bf16`
            key, value = renames[key][0], renames[key][1].get(value.strip(), value)
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        flag = "--" + key.replace("_", "-")
        if hints[key] is bool:
            if value.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(f"--set {item!r}: {key} is true or false")
            argv.append(flag if value.strip().lower() in _TRUE else f"--no-{flag[2:]}")
        elif typing.get_origin(hints[key]) in (list, tuple):
            argv += [flag, *value.split(",")]
        else:
            argv.append(f"{flag}={value}")
    return argv


# -- run directories ---------------------------------------------------------------------------


# The CPU features that decide a run's speed here: vector width, and whether bf16 is native.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def cpu(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name and which of `CPU_FEATURES` it has, e.g. "AMD EPYC (avx2, fma)": timings
    from CPUs of different features do not compare (bf16 is emulated without avx512_bf16 or AMX)."""
    try:
        info = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({', '.join(f for f in CPU_FEATURES if f in flags) or 'none of ' + '/'.join(CPU_FEATURES)})"


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
        "cpu": cpu(),
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "argv": sys.argv,
    }


def write_run_record(out: str | os.PathLike, config: Any, extra: dict | None = None, *, experiment: str) -> None:
    """`config.json` in the run directory: what ran (`experiment`: stem, delusion, agent, train,
    ...), the resolved config, the environment, and `extra`."""
    record = {"experiment": experiment, "config": dataclasses.asdict(config), "environment": environment()}
    atomic_write_text(Path(out) / "config.json", json.dumps({**record, **(extra or {})}, indent=2, default=str) + "\n")


class RunDirError(ValueError):
    """A run directory that does not fit the command: it holds a run of another experiment or
    another config, a run the command would start over on, or nothing to report yet."""


def check_run_dir(
    out: str | os.PathLike,
    config: Any,
    *,
    experiment: str,
    resume: bool = True,
    may_change: tuple[str, ...] = (),
) -> dict | None:
    """The one run-directory guard: a directory holds one run, of one experiment and one config.

    Returns the stored record (`config.json`), or None where the directory holds no run yet.
    Raises `RunDirError` where it holds a run and `resume` is false (the command would start over
    on top of it), a run of another experiment, or a run of another config: every differing field
    is named with its stored and its new value. The fields in `may_change` may differ (how far or
    how visibly a run goes: seeds, episodes, progress bars)."""
    path = Path(out) / "config.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if not resume:
        raise RunDirError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    stored = record.get("experiment")  # records written before every run named its experiment lack it
    if stored is not None and stored != experiment:
        raise RunDirError(f"{out} holds a {stored!r} run, not a {experiment!r} one; choose another --out")
    old = dict(record.get("config") or {})
    for name, (renamed, values) in renamed_fields(type(config)).items():  # a record from before a rename
        if name in old and renamed not in old:
            value = old.pop(name)
            old[renamed] = values.get(value, value) if isinstance(value, str) else value
    new = json.loads(json.dumps(dataclasses.asdict(config), default=str))  # as `write_run_record` stores it
    missing = "(none)"
    diff = [k for k in {**old, **new} if k not in may_change and old.get(k, missing) != new.get(k, missing)]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in diff)
        keep = f" (only {', '.join(may_change)} may change)" if may_change else ""
        raise RunDirError(
            f"{out} holds a run with a different config ({changes}); rerun with its settings{keep} "
            "or choose another --out"
        )
    return record
