"""SIGKILL during one tenant's update (issue 35): a `dostream serve --learn` process where alpha and
bravo have each learned once, killed while alpha's second update trains and bravo's clients chat;
restarted, every tenant serves its last accepted version, alpha's half-done update is discarded
and redone, and nothing acknowledged (answers, feedback) is lost."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading

import httpx
import openai
from harness import KEY, _free_port, client, running, serve_process, wait_for

from dostream.serve.app import ServeConfig, Server
from dostream.serve.learn import LearnConfig
from dostream.serve.store import ServeStore

KILLED = dict(lora_r=4, lora_alpha=8, epochs=2, gate_learned=0)  # an update long enough to be caught inside
FLAGS = ["--learn", "--update-every-tokens", str(1 << 30), *(f"--{k.replace('_', '-')}={v}" for k, v in KILLED.items())]
ASK = dict(model="tiny", max_tokens=8, temperature=0)


def _teach(url: str, key: str, n: int, tag: str, acked: dict, feedback: set) -> None:
    for i in range(n):
        res = client(url, key).chat.completions.create(
            messages=[{"role": "user", "content": f"Which detail does Skyway want? {tag}{i}"}], **ASK
        )
        acked[res.id] = res.choices[0].message.content
        fb = client(url, key).post(
            "/feedback",
            cast_to=object,
            body={"completion_id": res.id, "author": "environment", "text": "Skyway wants the booking reference."},
        )
        feedback.add(fb["id"])


def _as(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEY}", "X-Tenant": tenant}


def _learn(url: str, tenant: str, wait: bool = True) -> dict:
    r = httpx.post(url + "/v1/learn", json={"wait": wait}, headers=_as(tenant), timeout=300)
    assert r.status_code == (200 if wait else 202), r.text
    return r.json()


def _listing(url: str, tenant: str) -> dict:
    return httpx.get(url + "/v1/adapters", headers=_as(tenant), timeout=10).json()


def _versions(store, tenant: str) -> list[tuple]:
    db = sqlite3.connect(store / "tenants" / tenant / "versions.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return db.execute("SELECT id, accepted, current, current_version FROM versions ORDER BY id").fetchall()
    finally:
        db.close()


def test_sigkill_during_a_tenants_update_then_restart(tmp_path, tok):
    store = tmp_path / "store"
    keys = ServeStore.open_dir(store)
    key = {t: keys.add_key(t, ("chat", "feedback"), t)[1] for t in ("alpha", "bravo")}
    keys.close()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    acked: dict[str, str] = {}
    feedback: set[str] = set()
    proc = serve_process(store, port, *FLAGS)
    try:
        for tenant in ("alpha", "bravo"):
            _teach(url, key[tenant], 2, tenant, acked, feedback)
            assert _learn(url, tenant)["status"] == "accepted"
        _teach(url, key["alpha"], 3, "alpha-more", acked, feedback)
        _learn(url, "alpha", wait=False)
        half = store / "tenants" / "alpha" / "adapters" / "update-000002"
        wait_for(lambda: _listing(url, "alpha")["running"])
        wait_for(half.exists)  # inside alpha's update: training has begun writing
        stop = threading.Event()

        def bravo_chats() -> None:  # acknowledged while alpha trains, up to the kill
            try:
                while not stop.is_set():
                    _teach(url, key["bravo"], 1, f"b{len(acked)}", acked, feedback)
            except (openai.APIConnectionError, openai.InternalServerError, httpx.HTTPError):
                return

        chatter = threading.Thread(target=bravo_chats)
        chatter.start()
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
        chatter.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r[0] for r in _versions(store, "alpha")] == [1] and half.exists()  # the killed update left no row
    in_force = {t: _versions(store, t)[-1][2:] for t in ("alpha", "bravo")}
    assert all(v[1] == 1 for v in in_force.values()) and in_force["alpha"][0] != in_force["bravo"][0]
    db = sqlite3.connect(store / "serve.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = dict(db.execute("SELECT id, request FROM exchanges"))
    kept = {i for (i,) in db.execute("SELECT id FROM feedback")}
    db.close()
    for cid, content in acked.items():
        assert cid in rows, f"acknowledged {cid} was lost"
        assert json.loads(rows[cid])["choices"][0]["message"]["content"] == content
    assert feedback <= kept
    # restarted (the `Server` `dostream serve` runs, built here: the killed process was real)
    learn = LearnConfig(update_every_tokens=1 << 30, **KILLED)
    server = Server(ServeConfig(model="tiny", store=str(store), learn=learn), env_key=KEY, tok=tok)
    with running(server) as url:
        for tenant in ("alpha", "bravo"):
            assert _listing(url, tenant)["current"] == {"version": 1, "adapter": in_force[tenant][0]}
            res = client(url, key[tenant]).chat.completions.create(
                messages=[{"role": "user", "content": "after the restart"}], **ASK
            )
            adapter = server.store._one("SELECT adapter FROM exchanges WHERE id = ?", (res.id,))[0]
            assert adapter == in_force[tenant][0]  # its last accepted version serves it
        assert not half.exists()  # alpha's interrupted update was discarded
        redo = _learn(url, "alpha")  # and is redone: what it had not recorded as seen is still new
        assert redo["status"] == "accepted" and redo["version"] == 2, redo
        assert _listing(url, "bravo")["current"]["version"] == 1
