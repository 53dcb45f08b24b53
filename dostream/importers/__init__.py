"""Importers: public transcript formats → dostream streams, with the provenance stated.

`import_streams(paths, assistant="other")` reads JSON Lines, JSON arrays and single JSON documents
incrementally (`jsonio.py`), tells each record's format (`auto.py`: OpenAI chat, ShareGPT,
Alpaca, TRL, dostream's own), converts it (one module per format; OpenAI messages through
`openai.messages_to_segments`, which the OpenAI-compatible server uses too) and yields `Stream`s
with stable ids (the record's `id`, `conversation_id` or `uuid`, else `<file name>:<index>`).
Who wrote what is never guessed (`base.py`): assistant turns need `assistant="self"|"other"`
unless the data says it (`author`, `weight`, `token_ids`). `dostream import` is the command.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from dostream.importers.auto import FORMATS, ID_KEYS, convert, detect, find_messages
from dostream.importers.base import PROVENANCE_HELP, Provenance, ProvenanceError, RecordError, parse_role_map
from dostream.importers.jsonio import iter_json
from dostream.importers.openai import messages_to_segments
from dostream.stream import Stream, StreamError

__all__ = [
    "FORMATS",
    "ImportReport",
    "PROVENANCE_HELP",
    "Provenance",
    "ProvenanceError",
    "RecordError",
    "detect",
    "find_messages",
    "import_streams",
    "messages_to_segments",
    "parse_role_map",
]


@dataclass
class ImportReport:
    """What an import read, kept and skipped (by reason), and whose turns it kept."""

    files: int = 0
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    formats: Counter = field(default_factory=Counter)
    tool_calls: int = 0
    assistant_authors: Counter = field(default_factory=Counter)  # author -> assistant-role segments

    def summary(self) -> str:
        formats = ", ".join(f"{k} {v}" for k, v in self.formats.most_common())
        parts = [f"read {self.read} record(s) from {self.files} file(s)" + (f" ({formats})" if formats else "")]
        parts.append(f"kept {self.kept}")
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            reasons = "; ".join(f"{n} × {r}" for r, n in self.skipped.most_common(6))
            more = "; ..." if len(self.skipped) > 6 else ""
            parts.append(f"skipped {n_skipped} ({reasons}{more})")
        parts.append(f"{self.tool_calls} tool call(s)")
        if self.assistant_authors:
            who = ", ".join(f"{n} {a}" for a, n in self.assistant_authors.most_common())
            parts.append(f"assistant-role segments: {who}")
        return "; ".join(parts)


def _stream_id(record: dict, name: str, index: int) -> str:
    for k in ID_KEYS:
        v = record.get(k)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
            return str(v)
    return f"{os.path.basename(name)}:{index}"


def import_streams(
    paths: Iterable[str],
    *,
    fmt: str = "auto",
    assistant: str | None = None,
    role_map: dict[str, str] | None = None,
    messages_key: str | None = None,
    skip_invalid: bool = False,
    dedupe: bool = False,
    report: ImportReport | None = None,
) -> Iterator[Stream]:
    """Yield the streams of transcript files (see the module docstring).

    A bad record raises `StreamError` naming the file, the line and the field; with
    `skip_invalid` it is counted in `report.skipped` by reason and skipped. Assistant turns with no
    stated author and no `assistant` raise `ProvenanceError` (a decision, never skipped). A repeated
    id raises `StreamError` unless `dedupe` (then later ones are skipped and counted)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    prov = Provenance(assistant=assistant, role_map=dict(role_map or {}))
    report = report if report is not None else ImportReport()
    seen: dict[str, str] = {}
    for path in paths:
        name = "<stdin>" if str(path) == "-" else str(path)
        report.files += 1
        index = 0
        for line, record in iter_json(str(path), skip_invalid=skip_invalid, name=name):
            report.read += 1
            try:
                if isinstance(record, StreamError):
                    raise record
                try:
                    if not isinstance(record, dict):
                        raise RecordError("", f"expected a JSON object (one conversation), got {type(record).__name__}")
                    segments, n_calls, used = convert(record, fmt, prov, messages_key)
                    if not segments:
                        raise RecordError(messages_key or "messages", "a stream needs at least one segment")
                except RecordError as e:
                    raise StreamError(e.reason, path=name, line=line, field=e.field or None) from None
                except ProvenanceError as e:
                    raise ValueError(
                        f"--assistant is needed: {name}:{line} ({e.where}) is an assistant turn with no author of its"
                        " own. Pass --assistant self if the model you are about to train sampled these turns (author"
                        " agent: kept in the context, masked under the interventional view), or --assistant other if"
                        " another model or a person wrote them (author teacher: demonstrations, supervised)."
                    ) from None
                sid = _stream_id(record, name, index)
                if sid in seen:
                    if not dedupe:
                        raise StreamError(
                            f"duplicate id {sid!r} (first at {seen[sid]}); pass --dedupe to keep only the first",
                            path=name,
                            line=line,
                            field="id",
                        )
                    report.skipped["duplicate id (--dedupe)"] += 1
                    continue
            except StreamError as err:
                if not skip_invalid or err.field == "id" and not dedupe:
                    raise
                report.skipped[f"{err.field}: {err.reason}" if err.field else err.reason] += 1
                continue
            finally:
                index += 1
            seen[sid] = f"{name}:{line}"
            meta = dict(record["meta"]) if isinstance(record.get("meta"), dict) else {}
            meta["import"] = {"file": os.path.basename(name), "line": line, "index": index - 1, "format": used}
            report.kept += 1
            report.formats[used] += 1
            report.tool_calls += n_calls
            report.assistant_authors.update(s.author for s in segments if s.role == "assistant")
            yield Stream(sid, segments, meta)
