"""What `Memory.forget` rewrites beside deleting links and counts: the admission records of the notes
it keeps. An admission record (`admit.py`) lists the streams a note was tested on (`covered`,
`others`); a forgotten source's stream ids must not stay there."""

from __future__ import annotations

import json


def admissions_without(db, col: str, value: str, skip: set[int]) -> list[tuple[str, tuple]]:
    """Statements rewriting each note's admission record (but the `skip` notes') without the
    forgotten source's streams (`col` = `value`: a stream, or a user's or key's by their links'
    streams; an id or its parts `ID#...`) in its `covered` and `others` lists, with their per-stream
    figures; the pooled figures stay (numbers, no ids). Run before the links are deleted."""
    q = f"SELECT DISTINCT stream FROM links WHERE {col} = ?"
    sources = {value} if col == "stream" else {s for (s,) in db.execute(q, (value,))}
    out = []
    for nid, adm in db.execute("SELECT id, admission FROM notes WHERE admission IS NOT NULL"):
        record, changed = json.loads(adm), False
        for p in (record.get(part) or {} for part in ("covered", "others")) if nid not in skip else ():
            ids = p.get("streams") or []
            keep = [i for i, sid in enumerate(ids) if sid not in sources and sid.split("#", 1)[0] not in sources]
            if len(keep) < len(ids):
                if isinstance(p.get("per_stream"), list) and len(p["per_stream"]) == len(ids):
                    p["per_stream"] = [p["per_stream"][i] for i in keep]
                p["streams"], changed = [ids[i] for i in keep], True
        if changed:
            out.append(("UPDATE notes SET admission = ? WHERE id = ?", (json.dumps(record), nid)))
    return out
