"""Incremental JSON reading: JSON Lines, a JSON array, or one (pretty-printed) JSON document.

`iter_json(path)` yields `(line, value)` for every top-level record, reading the file in pieces:
a 1 GB array is decoded one element at a time with `json.JSONDecoder.raw_decode`, never loaded
whole. Which shape a file has is decided from its first line:

* the first non-blank character is `[`: an array; each element is a record;
* the first non-blank line is a complete JSON value: JSON Lines, one record per line (a bad line
  is one bad record; the others still read);
* otherwise one JSON document (a pretty-printed object, or several concatenated): each top-level
  value is a record.

`line` is the line a record starts on, for error messages (`file:line: ...`). A value that is not
valid JSON raises `StreamError` naming the file and line; with `skip_invalid=True` it is yielded
as the `StreamError` instead (JSON Lines resumes at the next line; an array or document cannot
resume and stops after it).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from typing import Any

from dostream.stream import StreamError

_CHUNK = 1 << 20
_DECODER = json.JSONDecoder()
_WS = " \t\r\n\ufeff"


def shape_of(head: str) -> str:
    """`array`, `lines` or `document`, from the start of a file (see the module docstring)."""
    text = head.lstrip(_WS)
    if text.startswith("["):
        return "array"
    first = text.split("\n", 1)[0].rstrip()
    try:
        json.loads(first)
        return "lines"
    except json.JSONDecodeError as e:
        # A value cut at the end of the line continues on the next one: a pretty-printed document.
        # An error inside the line is a bad JSON Lines record.
        return "document" if e.pos >= len(first) - 1 or e.msg.startswith("Unterminated") else "lines"


def iter_json(path: str, *, skip_invalid: bool = False, name: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(line, value)` per record of a JSON Lines / JSON array / JSON document file
    (`-`: standard input). See the module docstring."""
    name = name or ("<stdin>" if path == "-" else path)
    f = sys.stdin if path == "-" else open(path, encoding="utf-8-sig")  # a BOM is not part of the JSON
    try:
        head = f.read(_CHUNK)
        shape = shape_of(head)
        if shape == "lines":
            yield from _lines(head, f, name, skip_invalid)
        else:
            yield from _Values(head, f, name).records(array=shape == "array", skip_invalid=skip_invalid)
    finally:
        if f is not sys.stdin:
            f.close()


def _lines(head: str, f: io.TextIOBase, name: str, skip_invalid: bool) -> Iterator[tuple[int, Any]]:
    def physical() -> Iterator[str]:
        parts = head.splitlines(keepends=True)
        if parts and not parts[-1].endswith("\n"):
            parts[-1] += f.readline()  # the head chunk ended inside a line
        yield from parts
        yield from f

    for lineno, line in enumerate(physical(), start=1):
        if not line.strip(_WS):
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            err = StreamError(f"not valid JSON ({e.msg} at column {e.colno})", path=name, line=lineno)
            if not skip_invalid:
                raise err from None
            yield lineno, err


class _Values:
    """Top-level values (or an array's elements) decoded one at a time from a growing buffer."""

    def __init__(self, head: str, f: io.TextIOBase, name: str):
        self.f, self.name = f, name
        self.buf, self.pos, self.line = head, 0, 1  # `line` is the line of `pos`
        self.eof = not head

    def _advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def _fill(self) -> bool:
        """Read more (at least as much as is buffered, so re-decoding a long value stays linear)."""
        if self.eof:
            return False
        data = self.f.read(max(_CHUNK, len(self.buf) - self.pos))
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def _skip_ws(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            n = len(self.buf)
            i = self.pos
            while i < n and self.buf[i] in _WS:
                i += 1
            self._advance(i)
            if i < n:
                return self.buf[i]
            if not self._fill():
                return ""

    def _error(self, message: str, at: int | None = None) -> StreamError:
        line = self.line + (self.buf.count("\n", self.pos, at) if at is not None else 0)
        return StreamError(message, path=self.name, line=line)

    def _value(self) -> Any:
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # JSON strings and literals never hold a raw newline, so an error with a newline
                # after it is a real error; one at the end of the buffer may be a value cut short.
                if "\n" not in self.buf[e.pos :] and self._fill():
                    continue
                raise self._error(f"not valid JSON ({e.msg})", e.pos) from None
            if end == len(self.buf) and self._fill():
                continue  # a number cut at the end of the buffer may go on
            return value, end

    def records(self, *, array: bool, skip_invalid: bool) -> Iterator[tuple[int, Any]]:
        try:
            if array:
                self._skip_ws()
                self._advance(self.pos + 1)  # "["
                if self._skip_ws() == "]":
                    self._advance(self.pos + 1)
                else:
                    while True:
                        if not self._skip_ws():
                            raise self._error("not valid JSON (the array is not closed)")
                        line = self.line
                        value, end = self._value()
                        self._advance(end)
                        yield line, value
                        c = self._skip_ws()
                        if c == "]":
                            self._advance(self.pos + 1)
                            break
                        if c != ",":
                            raise self._error(
                                "not valid JSON (expected ',' or ']' after an array element)"
                                if c
                                else "not valid JSON (the array is not closed)"
                            )
                        self._advance(self.pos + 1)
                if self._skip_ws():
                    raise self._error("not valid JSON (data after the array's closing ']')")
            else:
                while self._skip_ws():
                    line = self.line
                    value, end = self._value()
                    self._advance(end)
                    yield line, value
        except StreamError as err:
            if not skip_invalid:
                raise
            yield err.line or 0, err  # an array or document cannot resume after a syntax error
