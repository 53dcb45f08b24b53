"""The one "this field is wrong" error, `FieldError`: what every reader of user data (stream files,
transcripts, stored rows, requests) raises for a value it cannot take, naming where and which field.

>>> str(FieldError("messages[3].content", "expected a string, got int", where="chats.jsonl:7"))
"chats.jsonl:7: field 'messages[3].content': expected a string, got int"

The code that parses a record knows the field; the code that read it knows the file and line: a
parser raises `FieldError(field, reason)` and the reader re-raises it located (`stream.StreamError`,
the subclass that names `path` and `line`). Other names of it: `importers.RecordError` (a transcript
record), `serve.record.FieldError` (a request field, rendered `field: reason` for API clients).
"""

from __future__ import annotations


class FieldError(ValueError):
    """Input wrong in one field: `field` is its path inside the record (`messages[3].content`;
    None or "" for the record as a whole), `reason` what is wrong with it, `where` the record
    (`file:line`, a store row; None until the reader adds it). Rendered
    `where: field 'x': reason`, each part only where known."""

    where: str | None = None
    field: str | None = None
    reason: str = ""

    def __init__(self, field: str | None, reason: str | None = None, *, where: str | None = None):
        if reason is None:
            # A subclass with a rendering of its own set `field` and `reason` and passes its message
            # alone (serve.record.FieldError).
            super().__init__(field)
            return
        self.field, self.reason, self.where = field, reason, where
        super().__init__(f"{where}: {self.what}" if where else self.what)

    @property
    def what(self) -> str:
        """The message less `where`: `field 'x': reason` (the reason alone for a whole record)."""
        return f"field {self.field!r}: {self.reason}" if self.field else self.reason
