"""The gate's questions for a served agent: the control file and its checks. Knows no model.

A check is a conversation so far and the strings a passing reply holds (`expect`) and does not
(`forbid`). The server's learner (`serve/learn.py`) asks the control set and the latest replies
that earned a reward; `learning.gate.Gate` decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dostream.stream import Segment


@dataclass
class Check:
    """One gate question: a conversation so far and what a passing reply contains (every string of
    `expect`) and does not (any of `forbid`), ignoring case."""

    id: str
    segments: list[Segment]
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    max_tokens: int = 0  # 0: the gate's default
    source: str = ""

    def passes(self, text: str) -> bool:
        low = text.lower()
        return all(e.lower() in low for e in self.expect) and not any(f.lower() in low for f in self.forbid)


def _strings(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: field '{key}': expected a list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{where}: field '{key}[{i}]': expected a non-empty string")
    return tuple(value)


def read_control(path: str | Path) -> list[Check]:
    """The control set: JSON Lines, one conversation per line,
    `{"id"?, "messages": [OpenAI chat messages], "tools"?, "expect": [str, ...], "forbid"?: [str,
    ...], "max_tokens"?: int}`, at least one string in `expect` or `forbid`. The messages become
    segments as a request's do (`serve.record.new_segments`); the gate samples the next assistant
    turn. A bad line is an error naming the file, the line and the field."""
    from dostream.serve.record import FieldError, new_segments

    checks: list[Check] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--control: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        unknown = sorted(set(obj) - {"id", "messages", "tools", "expect", "forbid", "max_tokens"})
        if unknown:
            raise ValueError(f"{where}: field '{unknown[0]}': unknown field")
        messages, tools = obj.get("messages"), obj.get("tools")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages': expected a non-empty list of chat messages")
        if tools is not None and not isinstance(tools, list):
            raise ValueError(f"{where}: field 'tools': expected a list")
        try:
            segments = new_segments(messages, 0, tools, "teacher")
        except FieldError as e:
            raise ValueError(f"{where}: field '{e.field}': {e.reason}") from None
        expect, forbid = _strings(obj, "expect", where), _strings(obj, "forbid", where)
        if not expect and not forbid:
            raise ValueError(f"{where}: field 'expect': a check needs a string in expect or forbid")
        max_tokens = obj.get("max_tokens", 0)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"{where}: field 'max_tokens': expected a positive integer")
        cid = obj.get("id", f"control-{n}")
        checks.append(Check(str(cid), segments, expect, forbid, max_tokens, where))
    if not checks:
        raise ValueError(f"--control: {path} holds no conversation")
    return checks
