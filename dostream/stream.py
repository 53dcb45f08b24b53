"""Streams: segments of text, each with exactly one author.

A `Stream` is the unit dostream stores, renders and trains on: an ordered list of `Segment`s.
Every segment records who wrote it (`author`, from the closed vocabulary `AUTHORS`), and agent
segments produced by sampling keep the exact token ids the model sampled (`token_ids`).

The file format is JSON Lines, one stream per line, in one of two shapes:

    {"id": "s1", "segments": [{"author": "context", "text": "Question: ..."}, ...], "meta": {}}
    {"id": "s2", "messages": [{"role": "user", "content": "Hi", "author": "user"}, ...]}

The chat shape (OpenAI / TRL conversational) is converted on load; a message without `author`
takes it from its role through a role→author map (`DEFAULT_ROLE_MAP`, `assistant` → `agent`).

>>> s = Stream("demo", [Segment("user", "2+2?"), Segment("agent", " 5")])
>>> s.text
'2+2? 5'
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dostream.errors import FieldError
from dostream.files import atomic_open

AUTHORS: tuple[str, ...] = (
    "agent",
    "user",
    "teacher",
    "tool",
    "verifier",
    "oracle",
    "environment",
    "protocol",
    "context",
)

_WORLD = frozenset(AUTHORS) - {"agent", "context"}

# THE table of named loss views: name -> (the authors whose tokens are supervised, what it is for).
# Every method, experiment and the agent names its view here; `--view NAME` accepts every name.
_VIEW_TABLE: tuple[tuple[str, frozenset[str], str], ...] = (
    ("interventional", _WORLD, "the rule: every world-written token; the agent's own and the given context masked"),
    ("observational", _WORLD | {"agent"}, "standard SFT: every token but the given context, the agent's own included"),
    ("teacher", frozenset({"teacher"}), "demonstrations only (STEM SFT-1: the oracle solution after the prompt)"),
    ("stem-oracle", frozenset({"oracle"}), "the STEM stream's interventional arm and oracle SFT: the corrections only"),
    (
        "stem-observational",
        frozenset({"agent", "oracle"}),
        "the STEM stream's observational arm: attempts + corrections",
    ),
    ("stem-rest", frozenset({"agent", "teacher"}), "ReST: the verifier-passing samples and the replayed solutions"),
    ("tutor-standard", frozenset({"protocol", "user", "agent"}), "the delusion experiment's standard SFT"),
    ("tutor-interventional", frozenset({"protocol", "user"}), "the delusion experiment's interventional SFT"),
)
VIEWS: dict[str, frozenset[str]] = {name: authors for name, authors, _ in _VIEW_TABLE}
VIEW_HELP: dict[str, str] = {name: help_ for name, _, help_ in _VIEW_TABLE}

DEFAULT_ROLE_MAP: dict[str, str] = {
    "system": "context",
    "developer": "context",
    "user": "user",
    "assistant": "agent",
    "tool": "tool",
    "ipython": "tool",
}


def view_authors(view: str | Iterable[str]) -> frozenset[str]:
    """Resolve a loss view to its set of supervised authors.

    `view` is a name from `VIEWS` (`interventional`, `observational`, `stem-oracle`, ...), a
    comma-separated author list (`"oracle,protocol"`), or any iterable of authors.

    >>> sorted(view_authors("oracle,verifier"))
    ['oracle', 'verifier']
    """
    if isinstance(view, str):
        if view in VIEWS:
            return VIEWS[view]
        names = [v.strip() for v in view.split(",") if v.strip()]
    else:
        names = list(view)
    unknown = [n for n in names if n not in AUTHORS]
    if unknown or not names:
        raise ValueError(
            f"unknown view {view!r}: use one of {', '.join(VIEWS)} or a comma-separated subset of {', '.join(AUTHORS)}"
        )
    return frozenset(names)


@dataclass
class Segment:
    """A span of text written by one author.

    `token_ids` is set only on agent segments produced by sampling: the exact ids the model
    sampled, which rendering uses instead of re-tokenising `text`. `role` is the chat role the
    segment is rendered in under a chat template (optional; see `render/`).
    """

    author: str
    text: str
    token_ids: list[int] | None = None
    role: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.author not in AUTHORS:
            raise ValueError(f"unknown author {self.author!r} (expected one of {', '.join(AUTHORS)})")
        if self.token_ids is not None and self.author != "agent":
            raise ValueError(f"token_ids on a {self.author!r} segment: only agent segments carry sampled ids")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"author": self.author, "text": self.text}
        if self.token_ids is not None:
            d["token_ids"] = list(self.token_ids)
        if self.role is not None:
            d["role"] = self.role
        if self.meta:
            d["meta"] = self.meta
        return d


@dataclass
class Stream:
    """An ordered list of segments with an id and free-form `meta`."""

    id: str
    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)
    # Where it was read from (`file:line`), for error messages; not part of the stream's data.
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "segments": [s.to_json() for s in self.segments]}
        if self.meta:
            d["meta"] = self.meta
        return d


class StreamError(FieldError):
    """Bad stream input: the `errors.FieldError` located in a file (`path`, `line`). The message
    names the file, the line and the field."""

    def __init__(self, message: str, *, path: str = "<input>", line: int | None = None, field: str | None = None):
        self.path, self.line = path, line
        super().__init__(field, message, where=path if line is None else f"{path}:{line}")


def _expect(obj: dict, key: str, types: type | tuple[type, ...], where: str, *, required: bool = True):
    if key not in obj:
        if required:
            raise FieldError(f"{where}{key}", "missing field")
        return None
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise FieldError(f"{where}{key}", f"expected {names}, got {type(value).__name__}")
    return value


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _segment_from_json(obj: Any, where: str, *, text_key: str, author: str | None = None) -> Segment:
    if not isinstance(obj, dict):
        raise FieldError(where.rstrip("."), f"expected an object, got {type(obj).__name__}")
    if author is None:
        author = _expect(obj, "author", str, where)
    if author not in AUTHORS:
        raise FieldError(f"{where}author", f"unknown author {author!r} (expected one of {', '.join(AUTHORS)})")
    text = _text(_expect(obj, text_key, str, where), f"{where}{text_key}")
    token_ids = _expect(obj, "token_ids", list, where, required=False)
    if token_ids is not None:
        if author != "agent":
            raise FieldError(
                f"{where}token_ids", f"token_ids on a {author!r} segment: only agent segments carry sampled ids"
            )
        for i, t in enumerate(token_ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < MAX_TOKEN_ID:
                raise FieldError(
                    f"{where}token_ids[{i}]", f"expected a non-negative integer below {MAX_TOKEN_ID}, got {t!r}"
                )
    role = _expect(obj, "role", str, where, required=False)
    meta = _expect(obj, "meta", dict, where, required=False) or {}
    return Segment(author=author, text=text, token_ids=token_ids, role=role, meta=meta)


def stream_from_json(obj: Any, role_map: dict[str, str] | None = None) -> Stream:
    """Build a `Stream` from one decoded JSON line (segments or chat form).

    Raises `errors.FieldError` (converted to `StreamError` with file and line by the readers).
    """
    if not isinstance(obj, dict):
        hint = f" ({IMPORT_HINT.format(what='a JSON array')})" if isinstance(obj, list) else ""
        raise FieldError("<line>", f"expected a JSON object, got {type(obj).__name__}{hint}")
    if "segments" not in obj and "messages" not in obj:
        other = next((k for k in _OTHER_FORMATS if k in obj), None)
        if other is not None:
            raise FieldError("segments", f"missing field: {IMPORT_HINT.format(what=_OTHER_FORMATS[other])}")
    if "id" not in obj:
        raise FieldError("id", "missing field (dostream import gives every stream a stable id)")
    sid = _expect(obj, "id", (str, int), "")
    if isinstance(sid, str):
        _text(sid, "id")
    meta = _expect(obj, "meta", dict, "", required=False) or {}
    if "segments" in obj and "messages" in obj:
        raise FieldError("segments", "a stream has either 'segments' or 'messages', not both")
    if "messages" in obj:
        role_map = DEFAULT_ROLE_MAP if role_map is None else role_map
        segments = []
        for i, m in enumerate(_expect(obj, "messages", list, "")):
            where = f"messages[{i}]."
            if not isinstance(m, dict):
                raise FieldError(f"messages[{i}]", f"expected an object, got {type(m).__name__}")
            role = _expect(m, "role", str, where)
            author = _expect(m, "author", str, where, required=False)
            if author is None:
                if role not in role_map:
                    raise FieldError(
                        f"{where}role", f"role {role!r} has no author in the role map and the message has no 'author'"
                    )
                author = role_map[role]
            seg = _segment_from_json(m, where, text_key="content", author=author)
            seg.role = role
            segments.append(seg)
    else:
        segments = [
            _segment_from_json(s, f"segments[{i}].", text_key="text")
            for i, s in enumerate(_expect(obj, "segments", list, ""))
        ]
    if not segments:
        raise FieldError("segments" if "segments" in obj else "messages", "a stream needs at least one segment")
    return Stream(id=str(sid), segments=segments, meta=meta)


def stored_stream(raw: str, where: str) -> Stream:
    """A stream as a store holds it (its JSON text). Damage (not JSON, a bad field) is a
    `StreamError` naming `where` (the store file and the row) and the field, never a traceback."""
    return _stored(raw, where, stream_from_json)


def stored_segments(raw: str, where: str) -> list[Segment]:
    """A list of segments as a store holds it (JSON text); damage as in `stored_stream`."""

    def parse(obj: Any) -> list[Segment]:
        if not isinstance(obj, list):
            raise FieldError("<row>", f"expected a JSON array of segments, got {type(obj).__name__}")
        return [_segment_from_json(s, f"[{i}].", text_key="text") for i, s in enumerate(obj)]

    return _stored(raw, where, parse)


def _stored(raw: Any, where: str, parse: Callable[[Any], Any]) -> Any:
    try:
        obj = json.loads(raw)
    except (TypeError, json.JSONDecodeError, RecursionError) as e:
        raise StreamError(f"stored row is not valid JSON ({getattr(e, 'msg', e)})", path=where) from None
    try:
        return parse(obj)
    except FieldError as e:
        raise StreamError(e.reason, path=where, field=e.field) from None


# What a line that is not a stream looks like, for the error that says what to do instead.
IMPORT_HINT = "this is {what}, not a dostream stream: run `dostream import FILE --out streams.jsonl` first"
_OTHER_FORMATS = {
    "conversations": "a ShareGPT row ('conversations')",
    "instruction": "an Alpaca row ('instruction')",
    "prompt": "a TRL prompt-completion row ('prompt')",
    "traj": "a trajectory ('traj')",
    "history": "a trajectory ('history')",
}


_PRINT_SKIPPED = 20  # invalid lines reported one by one; the rest are only counted


class _WholeFileError(StreamError):
    """The file is not JSON Lines at all: `skip_invalid` has nothing to skip to."""


def _not_json_lines(line: str, e: json.JSONDecodeError) -> str | None:
    """The first line of a JSON array or a pretty-printed JSON document: why it is not JSON Lines."""
    text = line.strip()
    if text.startswith("["):
        return IMPORT_HINT.format(what="a JSON array (JSON Lines holds one stream per line)")
    if text.startswith("{") and e.pos >= len(line.rstrip()) - 1:
        return IMPORT_HINT.format(what="a pretty-printed JSON document (JSON Lines holds one stream per line)")
    return None


MAX_TOKEN_ID = 2**31  # far above any vocabulary; ids past it cannot be tensors of int32 on every backend


def _text(value: str, field: str) -> str:
    """`value`, if it is text that can be written as UTF-8 (JSON's `\\ud800` escapes a lone
    surrogate, which is not a character)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(field, f"not valid Unicode text (a lone surrogate {value[e.start]!r} at {e.start})") from None
    return value


def _open_lines(path: str | os.PathLike) -> io.BufferedIOBase:
    # Bytes, decoded line by line, so that invalid UTF-8 is reported with its own line number.
    return sys.stdin.buffer if str(path) == "-" else open(path, "rb")


def read_streams(
    path: str | os.PathLike,
    *,
    skip_invalid: bool = False,
    role_map: dict[str, str] | None = None,
    errors: list[StreamError] | None = None,
) -> Iterator[Stream]:
    """Yield the streams of a JSONL file one line at a time (the file is never loaded whole).

    Blank lines are ignored. A bad line raises `StreamError` naming file, line and field; with
    `skip_invalid=True` it is reported on stderr, appended to `errors` if given, and skipped.
    `path` may be `-` for standard input.
    """
    name = "<stdin>" if str(path) == "-" else str(path)
    f = _open_lines(path)
    first, skipped = True, 0
    try:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise StreamError(
                        f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start} of the line)",
                        path=name,
                        line=lineno,
                    ) from None
                try:
                    obj = json.loads(line)
                except RecursionError:
                    raise StreamError("JSON nested too deeply to read", path=name, line=lineno) from None
                except json.JSONDecodeError as e:
                    whole = _not_json_lines(line, e) if first else None
                    if whole is not None:  # the whole file is in another shape: nothing to skip to
                        raise _WholeFileError(whole, path=name, line=lineno) from None
                    raise StreamError(f"not valid JSON ({e.msg} at column {e.colno})", path=name, line=lineno) from None
                if first and isinstance(obj, list):
                    raise _WholeFileError(IMPORT_HINT.format(what="a JSON array"), path=name, line=lineno)
                first = False
                try:
                    stream = stream_from_json(obj, role_map)
                except FieldError as e:
                    raise StreamError(e.reason, path=name, line=lineno, field=e.field) from None
                stream.source = f"{name}:{lineno}"
            except StreamError as err:
                first = False
                if not skip_invalid or isinstance(err, _WholeFileError):
                    raise
                skipped += 1
                if skipped <= _PRINT_SKIPPED:
                    print(f"skipping invalid stream: {err}", file=sys.stderr)
                elif skipped == _PRINT_SKIPPED + 1:  # thousands of lines would bury the summary
                    print("skipping more invalid streams: counted, not printed", file=sys.stderr)
                if errors is not None:
                    errors.append(err)
                continue
            yield stream
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def write_streams(path: str | os.PathLike, streams: Iterable[Stream]) -> int:
    """Write streams as JSONL, atomically (temp file + rename): an existing file is replaced only
    once the new one is complete. `path` may be `-` for standard output. Returns the count."""
    n = 0
    with contextlib.nullcontext(sys.stdout) if str(path) == "-" else atomic_open(path) as f:
        for s in streams:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
