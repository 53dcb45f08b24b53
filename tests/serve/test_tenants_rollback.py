"""A tenant's snapshot rolls back as a unit, memory included (issue 35), through a real server on
127.0.0.1: a note admitted to alpha's memory after its snapshot reaches alpha's prompts until the
rollback and never after (the note it superseded is retrieved again), the answer lists the memory
as restored, a rollback to the later snapshot brings the note back, and bravo's memory (the same
server, a note admitted meanwhile) is untouched."""

from __future__ import annotations

import json

import httpx
import pytest
from harness import KEY, client, conv_of, decisive_model, running

from dostream.memory.store import Cite, Memory
from dostream.serve.app import ServeConfig, Server
from dostream.serve.protocol import Limits
from dostream.stream import Segment, Stream

OLD = "The harbour vault opens with code 7731."
NEW = "The harbour vault opens with code 9000 since Monday."
BRAVO = "The harbour vault of Bravo opens with code 5150."
QUESTION = "Which code opens the harbour vault?"


def _told(sid: str, text: str) -> Stream:
    return Stream(sid, [Segment("user", text, role="user")])


@pytest.fixture
def tenancy(tok, tmp_path):
    memory = tmp_path / "memory"
    for tenant, text in (("alpha", OLD), ("bravo", BRAVO)):
        mem = Memory.open_dir(memory / "tenants" / tenant)
        mem.add(text, "extractive", evidence=[Cite(_told(f"told-{tenant}", text), 0)])
        mem.close()
    cfg = ServeConfig(model="tiny", store=str(tmp_path / "store"), memory=str(memory), limits=Limits(max_tokens=4))
    server = Server(cfg, env_key=KEY, model=decisive_model(tok), tok=tok)
    keys = {t: server.store.add_key(t, ("chat",), t)[1] for t in ("alpha", "bravo")}
    with running(server) as url:
        yield server, url, keys


def _notes_seen(server, url: str, key: str) -> str:
    """The notes put into the prompt of a new conversation asking QUESTION ('' for none)."""
    raw = client(url, key).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=2, temperature=0
    )
    segments = server.store.conversation_streams(conv_of(raw))[0].segments
    return "".join(s.text for s in segments if s.author == "context" and s.meta.get("memory_notes"))


def _admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    r = httpx.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_note_admitted_after_the_snapshot_leaves_the_prompts_with_the_rollback(tenancy):
    server, url, keys = tenancy
    alpha, bravo = server.tenants.get("alpha"), server.tenants.get("bravo")
    first = _admin(url, "POST", "/v1/tenants/alpha", {"context": "You serve Alpha."})
    assert first["memory"] == 1
    assert OLD in _notes_seen(server, url, keys["alpha"])
    with alpha.memory.lock:  # admitted after the snapshot, correcting the old note
        m = alpha.memory.memory
        new = m.add(NEW, "extractive", evidence=[Cite(_told("told-2", NEW), 0)])
        m.supersede(1, new)
    with bravo.memory.lock:  # bravo learns meanwhile: none of alpha's rollback's business
        bravo.memory.memory.add(BRAVO + " Twice.", "extractive", evidence=[Cite(_told("told-b2", BRAVO), 0)])
    second = _admin(url, "POST", "/v1/tenants/alpha", {"context": "You serve Alpha Ltd."})
    assert second["memory"] == new
    seen = _notes_seen(server, url, keys["alpha"])
    assert NEW in seen and OLD not in seen

    back = _admin(url, "POST", "/v1/tenants/alpha/rollback", {"snapshot": first["id"]})
    assert back["restored"] == ["adapter", "context", "memory"]
    assert (back["memory"], back["memory_at_snapshot"], back["context"]) == (1, 1, "You serve Alpha.")
    rolled = back["memory_rollback"]
    assert (rolled["rolled_back"], rolled["reactivated"]) == ([new], [1])
    assert "memory citations since the snapshot" in back["not_restored"]
    seen = _notes_seen(server, url, keys["alpha"])  # the running server, the next prompt
    assert OLD in seen and NEW not in seen
    assert _admin(url, "GET", "/v1/tenants/alpha")["memory"]["version"] == 1
    assert [n.text for n in bravo.memory.memory.notes()] == [BRAVO, BRAVO + " Twice."]
    assert BRAVO in _notes_seen(server, url, keys["bravo"])

    forward = _admin(url, "POST", "/v1/tenants/alpha/rollback", {"snapshot": second["id"]})
    assert forward["memory_rollback"]["restored"] == [new] and forward["memory"] == new
    seen = _notes_seen(server, url, keys["alpha"])
    assert NEW in seen and OLD not in seen


def test_a_rollback_the_memory_cannot_make_moves_nothing(tenancy):
    """Alpha's history branched (back to snapshot 1, then a note added): the rollback to the
    snapshot on the other branch is a 409 naming `snapshot`, and the adapter and context stay."""
    server, url, keys = tenancy
    alpha = server.tenants.get("alpha")
    first = _admin(url, "POST", "/v1/tenants/alpha", {"context": "one"})
    with alpha.memory.lock:
        alpha.memory.memory.add(NEW, "extractive", evidence=[Cite(_told("told-2", NEW), 0)])
    second = _admin(url, "POST", "/v1/tenants/alpha", {"context": "two"})
    _admin(url, "POST", "/v1/tenants/alpha/rollback", {"snapshot": first["id"]})
    with alpha.memory.lock:
        alpha.memory.memory.add("The pier is closed.", "extractive", evidence=[Cite(_told("told-3", "x"), 0)])
    before = _admin(url, "GET", "/v1/tenants/alpha")
    r = httpx.post(
        url + "/v1/tenants/alpha/rollback", headers={"Authorization": f"Bearer {KEY}"}, json={"snapshot": second["id"]}
    )
    assert r.status_code == 409 and r.json()["error"]["param"] == "snapshot"
    assert "snapshot: its memory (version 2) cannot be put back" in r.json()["error"]["message"]
    after = _admin(url, "GET", "/v1/tenants/alpha")
    assert (after["context"], after["memory"], after["snapshots"]) == (
        before["context"], before["memory"], before["snapshots"],
    )  # fmt: skip


def test_the_cli_rollback_puts_the_memory_back_too(tmp_path, capsys):
    """`dostream serve tenants rollback NAME --memory DIR` (no server): the memory with the rest."""
    from dostream.cli.serve import cli_main
    from dostream.serve.store import ServeStore
    from dostream.serve.tenants import lineage_of, memory_dir, record_snapshot

    store_dir, mdir = tmp_path / "store", memory_dir(tmp_path / "memory", "alpha")
    store = ServeStore.open_dir(store_dir)
    store.add_key("a", ("chat",), "alpha")
    lineage = lineage_of(store_dir, "alpha", None, store.versions)
    mem = Memory.open_dir(mdir)
    mem.add(OLD, "extractive", evidence=[Cite(_told("told-1", OLD), 0)])
    first = record_snapshot(store, "alpha", lineage, mdir, "first", "one")
    mem.add(NEW, "extractive", evidence=[Cite(_told("told-2", NEW), 0)])
    record_snapshot(store, "alpha", lineage, mdir, "second", "two")
    mem.close()
    store.close()
    argv = ["tenants", "rollback", "alpha", "--store", str(store_dir), "--memory", str(tmp_path / "memory")]
    assert cli_main([*argv, "--snapshot", str(first["id"])]) == 0
    back = json.loads(capsys.readouterr().out)
    assert back["restored"] == ["adapter", "context", "memory"] and back["memory_rollback"]["rolled_back"] == [2]
    mem = Memory.open_dir(mdir, read_only=True)
    assert [n.text for n in mem.notes()] == [OLD] and (back["memory"], back["context"]) == (1, "one")
    mem.close()
