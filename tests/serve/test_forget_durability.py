"""SIGKILL during a forget (issue 35): a `dostream serve` process serves tenants alpha and bravo
(each with two users and one accepted update; alpha's memory holds a note from each of its users)
while `dostream forget --user carol` (alpha's) runs beside it, killed right after each phase of its
journal in turn (`serve/forget.py`'s test hook), or while it learns a replayed update (polled); the
server is SIGKILLed too in some variants, stopped in the others, then restarted. After the restart:
the forget is done (the server's start resumed it: a forget killed before it deleted anything is
completed from its journal, not rolled back), carol's streams and notes are gone from the SQLite
files (WAL included), alpha serves its replayed version and bravo its last accepted one, and every
exchange acknowledged before the kill (dave's and bravo's users', answered while the forget ran) is
in the store. And an update the server learns while the killed forget waits for its resume is
replayed without carol too (it started from the adapter that learned from her)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from harness import KEY, _free_port, client, running, serve_process, wait_for

from dostream.memory.store import Cite, Memory
from dostream.serve.app import ServeConfig, Server
from dostream.serve.forget import CRASH_AFTER
from dostream.serve.learn import LearnConfig

SETTINGS = dict(lora_r=4, lora_alpha=8, epochs=2, gate_learned=0)
LEARN = LearnConfig(update_every_tokens=1 << 30, **SETTINGS)
LEARN_FLAGS = ["--update-every-tokens", str(1 << 30), *(f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items())]
ASK = dict(model="tiny", max_tokens=6, temperature=0)
CANARY = "KESTREL-4471"  # carol's: in her messages, the world's answers to her, and her note
USERS = {"alpha": ("carol", "dave"), "bravo": ("erin", "frank")}


def _as(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEY}", "X-Tenant": tenant}


def _listing(url: str, tenant: str) -> dict:
    return httpx.get(url + "/v1/adapters", headers=_as(tenant), timeout=10).json()


def _chat(url: str, key: str, user: str, text: str, feedback: str | None = None) -> str:
    res = client(url, key).chat.completions.create(messages=[{"role": "user", "content": text}], user=user, **ASK)
    if feedback is not None:
        body = {"completion_id": res.id, "author": "environment", "text": feedback}
        client(url, key).post("/feedback", cast_to=object, body=body)
    return res.id


def _said(user: str, i: int) -> tuple[str, str]:
    if user == "carol":
        return f"What is the gate code, carol {i}?", f"The gate code is {CANARY}."
    return f"When does the canteen open, {user} {i}?", "The canteen opens at nine."


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """The store and memory every variant copies: two tenants of two users each, each tenant one
    accepted update; alpha's memory a note from carol's conversation and one from dave's."""
    root = tmp_path_factory.mktemp("forget-base")
    store, memory = root / "store", root / "memory"
    server = Server(ServeConfig(model="tiny", store=str(store), memory=str(memory), learn=LEARN), env_key=KEY, tok=tok)
    keys = {t: server.store.add_key(t, ("chat", "feedback"), t)[1] for t in USERS}
    with running(server) as url:
        for tenant, users in USERS.items():
            for user in users:
                for i in range(2):
                    _chat(url, keys[tenant], user, *_said(user, i))
            r = httpx.post(url + "/v1/learn", json={"wait": True}, headers=_as(tenant), timeout=300)
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    alpha = server.store.slice("alpha")
    mem = Memory.open_dir(memory / "tenants" / "alpha")
    for user in USERS["alpha"]:
        [conv] = [c for c in alpha.conversations() if c.endswith(user)]
        stream = alpha.conversation_streams(conv)[0]
        world = next(i for i, s in enumerate(stream.segments) if s.author == "environment")
        mem.add(_said(user, 0)[1], "extractive", evidence=[Cite(stream, world)])
    mem.close()
    server.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    server.store.close()
    return root, keys


def _sqlite_bytes(*dirs) -> dict:
    return {f: f.read_bytes() for d in dirs for f in d.rglob("*.sqlite*")}


def _read(path, sql: str) -> list[tuple]:
    """Rows of `sql` in the SQLite file at `path`, opened read-only: closing it does not checkpoint
    the WAL (a read-write connection, the last to close, would: the byte checks would not see the
    file as a restarted server finds it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


class Chatter(threading.Thread):
    """dave (alpha's) and erin (bravo's) chat through the server until `stop` or until it dies;
    `acked`: each acknowledged exchange's id -> its tenant."""

    def __init__(self, url: str, keys: dict):
        super().__init__()
        self.url, self.keys, self.acked, self.stop = url, keys, {}, threading.Event()

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                for tenant, user in (("alpha", "dave"), ("bravo", "erin")):
                    self.acked[_chat(self.url, self.keys[tenant], user, f"Still there, {user} {i}?")] = tenant
                i += 1
                time.sleep(0.1)  # paced: too few commits for SQLite's own checkpoint (1000 pages) to run
        except (openai.APIConnectionError, openai.InternalServerError, httpx.HTTPError):
            return


@contextlib.contextmanager
def _serving(base, tmp_path):
    """A copy of the base store and memory, served by a `dostream serve --learn` subprocess on
    127.0.0.1; yields (store, memory, url, the process), which is killed on the way out if alive."""
    root, _ = base
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    store, memory = tmp_path / "store", tmp_path / "memory"
    assert any(CANARY.encode() in d for d in _sqlite_bytes(store, memory).values())  # the checks below can fail
    port = _free_port()
    proc = serve_process(store, port, "--learn", *LEARN_FLAGS, "--memory", str(memory))
    try:
        yield store, memory, f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _forget(store, memory, point: str) -> subprocess.Popen:
    """`dostream forget --user carol` (every tenant's), SIGKILLed by its test hook after `point`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_AFTER: point}
    cmd = [sys.executable, "-m", "dostream.cli", "forget", "--store", str(store), "--memory", str(memory)]
    return subprocess.Popen(
        [*cmd, "--user", "carol", "--model", "tiny", *LEARN_FLAGS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _killed(forget: subprocess.Popen) -> None:
    forget.wait(timeout=120)
    assert forget.returncode == -signal.SIGKILL, forget.stderr.read().decode()


def _restarted(store, memory, tok) -> tuple[Server, dict]:
    """The server restarted (the `Server` `dostream serve` runs, built here: the killed processes
    were real): its start resumed the forget. Returns it and the forget's record, checked done,
    checkpointed, and nothing of carol's left in any SQLite file (WALs included)."""
    server = Server(ServeConfig(model="tiny", store=str(store), memory=str(memory), learn=LEARN), env_key=KEY, tok=tok)
    for f, data in _sqlite_bytes(store, memory).items():  # the store, the tenants' versions and memories
        for gone in (CANARY.encode(), b"carol"):
            assert gone not in data, (gone, f)
    [(status, raw)] = server.store._all("SELECT status, record FROM forgets")
    record = json.loads(raw)
    assert status == "done" and record.get("checkpoint") == "complete", record
    assert record["counts"]["conversations"] == 1 and record["notes_forgotten"] == 1, record
    assert list(record["lineages"]) == ["alpha"]  # carol is alpha's only
    assert not (store / "tenants" / "alpha" / "adapters" / "update-000001").exists()  # learned from carol
    return server, record


KILLED_AT = {  # the kill point -> the journal's status it leaves
    "started": "started",  # journaled, nothing deleted
    "deleted": "deleted",  # carol's streams deleted, her notes not yet
    "memory": "memory",  # her notes forgotten, alpha still on the version that learned from her
    "rolled-back": "memory",  # alpha back on the version before (the base), its replay not learned
    "training": "memory",  # inside the replayed update (polled: its directory is being written)
    "replayed": "replayed",  # the replay recorded, the record not final, the file not checkpointed
    "done": "done",  # the record final, the file not yet checkpointed
}


@pytest.mark.parametrize(
    "point, server_dies",
    [
        ("deleted", True),
        pytest.param("started", False, marks=pytest.mark.slow),
        pytest.param("memory", True, marks=pytest.mark.slow),
        pytest.param("rolled-back", False, marks=pytest.mark.slow),
        pytest.param("training", True, marks=pytest.mark.slow),
        pytest.param("replayed", False, marks=pytest.mark.slow),
        pytest.param("done", True, marks=pytest.mark.slow),
    ],
)
def test_sigkill_during_a_forget_beside_a_server_then_restart(base, tok, tmp_path, point, server_dies):
    keys = base[1]
    with _serving(base, tmp_path) as (store, memory, url, proc):
        before = {t: _listing(url, t)["current"] for t in USERS}
        assert before["alpha"]["version"] == 1 and before["bravo"]["version"] == 1
        chatter = Chatter(url, keys)
        chatter.start()
        try:
            wait_for(lambda: len(chatter.acked) >= 2)
            forget = _forget(store, memory, point)
            if point == "training":
                adapters = store / "tenants" / "alpha" / "adapters"
                wait_for(lambda: forget.poll() is not None or any(adapters.glob("*-forget*")))
                forget.send_signal(signal.SIGKILL)
            _killed(forget)
            n = len(chatter.acked)
            wait_for(lambda: len(chatter.acked) >= n + 2)  # the server went on serving beside the dead forget
            if server_dies:
                os.kill(proc.pid, signal.SIGKILL)
            else:
                proc.terminate()
            proc.wait(timeout=60)
        finally:
            chatter.stop.set()
            chatter.join(timeout=60)
    assert _read(store / "serve.sqlite", "SELECT status FROM forgets") == [(KILLED_AT[point],)]
    if point == "training":  # killed inside the replayed update: not recorded
        versions = store / "tenants" / "alpha" / "versions.sqlite"
        assert not _read(versions, "SELECT 1 FROM versions WHERE seen LIKE '%forget%'")

    server, record = _restarted(store, memory, tok)
    [replayed] = record["lineages"]["alpha"]["replayed"]
    assert replayed["replaces"] == 1 and replayed["accepted"], record
    with running(server) as url:
        now = {t: _listing(url, t)["current"] for t in USERS}
        assert now["alpha"]["version"] == replayed["version"] and now["bravo"] == before["bravo"], now
        for tenant, user in (("alpha", "dave"), ("bravo", "frank")):
            fresh = _chat(url, keys[tenant], user, "after the restart")
            adapter = server.store._one("SELECT adapter FROM exchanges WHERE id = ?", (fresh,))[0]
            assert adapter == now[tenant]["adapter"] and (store / adapter).exists(), (tenant, adapter)
        for cid, tenant in chatter.acked.items():
            assert server.store.exchange(cid, tenant) is not None, f"acknowledged {cid} ({tenant}) was lost"
        convs = {t: httpx.get(url + "/v1/conversations", headers=_as(t)).json()["data"] for t in USERS}
    assert [c["id"] for c in convs["alpha"]] == ["alpha:dave"] and len(convs["bravo"]) == 2, convs
    notes = Memory.open_dir(memory / "tenants" / "alpha", read_only=True)
    assert [n.text for n in notes.notes()] == [_said("dave", 0)[1]]
    notes.close()


@pytest.mark.slow
def test_an_update_learned_beside_a_killed_forget_is_replayed_too(base, tok, tmp_path):
    """Killed after deleting carol's streams, the forget waits for its resume; meanwhile the server
    learns alpha's update 2 from dave's new turns, starting from update 1, which learned from carol.
    The resume replays update 2 too: no accepted adapter built on hers is left in force or on disk."""
    keys = base[1]
    with _serving(base, tmp_path) as (store, memory, url, proc):
        _killed(_forget(store, memory, "deleted"))
        for i in range(2, 4):
            _chat(url, keys["alpha"], "dave", *_said("dave", i))
        r = httpx.post(url + "/v1/learn", json={"wait": True}, headers=_as("alpha"), timeout=300)
        assert r.status_code == 200 and r.json()["status"] == "accepted" and r.json()["version"] == 2, r.text
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    server, record = _restarted(store, memory, tok)
    replayed = record["lineages"]["alpha"]["replayed"]
    assert [v["replaces"] for v in replayed] == [1, 2] and all(v["accepted"] for v in replayed), record
    assert not (store / r.json()["candidate"]).exists()
    with running(server) as url:
        listing = _listing(url, "alpha")
    assert listing["current"]["version"] == replayed[-1]["version"], listing
    kept = [
        u["version"] for u in listing["data"] if u["accepted"] and u["version"] and (store / u["candidate"]).exists()
    ]
    assert kept == [v["version"] for v in replayed], listing  # what a rollback could put back
