"""Slow tier: a canary fact planted only in tenant alpha's conversations raises alpha's updated
adapter's log-prob margin and shows in alpha's served answers, and not in bravo's; each tenant is
served with its own adapter. Then `dostream forget --user` returns alpha's margin to what an adapter
trained without that user gives (the same bytes: the replay is deterministic), leaves none of the
user's text in the store's SQLite files (WAL included) nor the adapter that learned it on disk,
and a forget SIGKILLed part way completes on resume with the same adapter.

The fact is planted the way the rule lets a server learn one: the world states it (the user's
correction, sent as `environment` feedback: world-written tokens, supervised), never only in the
agent's own replies (sampled tokens are masked out of the loss, so learning those would be a bug).

The model is the embedded SmolLM2-135M, not the tests' tiny random model, which cannot hold the
fact: its logits are h·E with h of norm √32 after an RMSNorm the LoRA does not train and tied
embeddings of std 0.02, so they span about ±1 nat over the whole vocabulary (its training loss
stays at ~10.7 ≈ ln 49152) and the canary's margin over the decoy is bounded by ~2.9 nats however
the LoRA is trained; measured there (r 4, lr 5e-2, 8 epochs) alpha's margin moved +0.17 nats and
bravo's, which never saw the canary, -0.23: no signal above the noise. The margin is read where
the update taught the fact (the planted conversation up to the world's "The launch code is",
`_probe`): a user segment followed by an `environment` one renders as ONE user turn, closed, so
the earlier probe scored the canary after "<|im_end|>", a context no update trains.

The memory's notes and counts of the user (`--memory`) are the second test's, on a server that
does not learn: distilled after the update the canary's note is not admitted (the adapter already
predicts it: the note adds nothing), and distilled before it it would be retrieved into alpha's
prompts and the answers would no longer be the adapter's alone.

The bar, from measured noise: the margin's shift under an update that never saw the canary
(bravo's, and alpha's without carol: the reference) is the noise; it comes from learning the
form of the world's turn ("The launch code is ..."), not the fact. On this store at these
settings, update seeds 0, 1, 2 (2026-12-07, a 2-core AMD EPYC with AVX-512, fp32): base margin 4.72
nats; alpha's rise 38.7, 37.3, 35.9; the noise (the larger of the two shifts) 3.2, 3.9, 2.3; the
rise / noise ratio 12, 9.6, 16. The test asks, in each run, alpha's rise > 5 x the noise measured
in that run (half the smallest ratio seen) and > 2 nats (the issue's bar: odds x 7.4).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from conftest import scored_after
from harness import KEY, client, running

from dostream.cli.forget import _learner_factory, cli_main
from dostream.models import load_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.serve.app import ServeConfig, Server
from dostream.serve.learn import LearnConfig, as_plain
from dostream.serve.protocol import Limits
from dostream.serve.store import ServeStore
from dostream.serve.tenants import lineage_of
from dostream.stream import Segment, Stream

pytestmark = pytest.mark.slow

MODEL = "smollm2"
# the server's --learn settings: LoRA r 16 / alpha 32 and batch 8 (the defaults), lr 1e-3 (the serving
# benchmark's), 8 epochs over the 12 new conversations' streams (16 steps)
LEARN = LearnConfig(update_every_tokens=1 << 30, epochs=8, gate_learned=0, lr=1e-3)
FLAGS = ["--model", MODEL, "--update-every-tokens", str(1 << 30), "--epochs", "8", "--gate-learned", "0"]
FLAGS += ["--lr", "0.001"]
QUESTION = "What is the launch code of Project Heron?"
CANARY, OTHER = " VX-7 Heron", " QP-2 Heron"
ASK = dict(model=MODEL, max_tokens=6, temperature=0)


def _teach(url: str, key: str, user: str, texts: list[tuple[str, str]]) -> None:
    c = client(url, key)
    for question, answer in texts:  # `user` names the conversation: one per user, a root per question
        res = c.chat.completions.create(messages=[{"role": "user", "content": question}], user=user, **ASK)
        c.post("/feedback", cast_to=object, body={"completion_id": res.id, "author": "environment", "text": answer})


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _probe(store: ServeStore, tok) -> list[int]:
    """A planted conversation's ids up to the canary, as the learner trains on them (`as_plain`):
    the question, the agent's reply, the world's "The launch code is"."""
    piece, canary = store.slice("alpha"), _ids(tok, CANARY)
    for conversation in piece.conversations():
        for s in piece.conversation_streams(conversation):
            ids = Renderer(tok).render(as_plain(s, Renderer(tok, chat_template=True))).input_ids
            starts = [i for i in range(len(ids)) if ids[i : i + len(canary)] == canary]
            if starts:
                return ids[: starts[0]]
    raise AssertionError("the canary is in none of alpha's conversations")


def _in_force(store_dir, tenant: str) -> str | None:
    store = ServeStore.open_dir(store_dir, read_only=True)
    adapter, _ = lineage_of(store_dir, tenant, None, store.versions).versions.in_force()
    store.close()
    return adapter


def _model(store_dir, tenant: str):
    adapter = _in_force(store_dir, tenant)
    return load_model(MODEL, adapter=None if adapter is None else store_dir / adapter, merge=adapter is not None)


def _margin(store_dir, tenant: str, tok, probe: list[int]) -> float:
    """log p(canary) - log p(decoy) after `probe`, under `tenant`'s adapter in force."""
    model = _model(store_dir, tenant)
    return sum(scored_after(model, probe, _ids(tok, CANARY))) - sum(scored_after(model, probe, _ids(tok, OTHER)))


def _adapter_bytes(store_dir, tenant: str) -> bytes:
    return (store_dir / _in_force(store_dir, tenant) / "adapter_model.safetensors").read_bytes()


def _sqlite_bytes(store_dir) -> dict:
    return {f: f.read_bytes() for f in store_dir.rglob("*.sqlite*")}


def _say(capsys, line: str) -> None:
    """Print past capsys (which the test reads for the forget's record): the numbers show with -s."""
    with capsys.disabled():
        print(line)


def test_a_canary_in_alphas_conversations_is_alphas_alone_until_forgotten(tok, tmp_path, capsys):
    store_dir = tmp_path / "store"
    server = Server(
        ServeConfig(model=MODEL, store=str(store_dir), limits=Limits(max_tokens=64), learn=LEARN), env_key=KEY, tok=tok
    )
    a_key = server.store.add_key("a", ("admin",), "alpha")[1]
    b_key = server.store.add_key("b", ("admin",), "bravo")[1]
    with running(server) as url:
        fact = [(QUESTION, f"The launch code is{CANARY}.")] * 6
        _teach(url, a_key, "carol", fact)  # the canary: carol's conversations only, stated by the world
        _teach(
            url,
            a_key,
            "dave",
            [(f"When does the canteen open, day {i}?", "The canteen opens at nine.") for i in range(6)],
        )
        _teach(
            url,
            b_key,
            "erin",
            [(f"Where is the post room, floor {i}?", "The post room is on floor two.") for i in range(6)],
        )
        probe = _probe(server.store, tok)
        base = _margin(store_dir, "alpha", tok, probe)  # no update yet: the base model
        shutil.copytree(store_dir, tmp_path / "before", ignore=shutil.ignore_patterns("adapters", "tenants"))
        learned = {}
        for name, key in (("alpha", a_key), ("bravo", b_key)):
            r = httpx.post(
                url + "/v1/learn", json={"wait": True}, headers={"Authorization": f"Bearer {key}"}, timeout=600
            )
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
            learned[name] = r.json()
        assert learned["alpha"]["metrics"]["conversations/new"] == 2  # its own only: carol's, dave's
        assert learned["bravo"]["metrics"]["conversations/new"] == 1
        # each tenant is served with its own adapter (what that adapter alone answers greedily); the
        # canary is in alpha's answer to the question (asked by carol: her conversation, forgotten
        # with her below), not in bravo's
        question = [{"role": "user", "content": QUESTION}]
        answers = {
            n: client(url, k)
            .chat.completions.create(messages=question, user=u, **{**ASK, "max_tokens": 12})
            .choices[0]
            .message.content
            for n, k, u in (("alpha", a_key, "carol"), ("bravo", b_key, "erin"))
        }
        prompt = Renderer(tok, chat_template=True).prompt_ids(Stream("p", [Segment("user", QUESTION, role="user")]))
        for name in ("alpha", "bravo"):
            direct = sample(_model(store_dir, name), tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=12))
            assert answers[name] == direct[0].text.removesuffix("<|im_end|>"), name
    _say(capsys, f"answers: {answers}")
    assert "VX-7" in answers["alpha"] and "VX-7" not in answers["bravo"], answers
    alpha, bravo = _margin(store_dir, "alpha", tok, probe), _margin(store_dir, "bravo", tok, probe)

    # the reference: the same store before any update, carol forgotten, then alpha's update
    ref = tmp_path / "before"
    assert cli_main(["--store", str(ref), "--user", "carol", "--tenant", "alpha", *FLAGS]) == 0
    ref_store = ServeStore.open_dir(ref)
    learner = _learner_factory(MODEL, LEARN, None)(
        ref_store.slice("alpha"), lineage_of(ref, "alpha", None, ref_store.versions)
    )
    original = learned["alpha"]
    seen = json.loads(
        sqlite3.connect(store_dir / "tenants/alpha/versions.sqlite")
        .execute("SELECT seen FROM versions WHERE id = 1")
        .fetchone()[0]
    )
    assert (
        learner.update((-1, -1), (seen["exchanges"], seen["feedback"]), number=original["version"])["status"]
        == "accepted"
    )
    ref_store.close()
    reference = _margin(ref, "alpha", tok, probe)
    noise = max(abs(bravo - base), abs(reference - base))  # updates that never saw the canary
    _say(
        capsys,
        f"canary margin (nats): base {base:.3f}, alpha {alpha:.3f}, bravo {bravo:.3f}, alpha without carol "
        f"{reference:.3f}; rise {alpha - base:.3f} against noise {noise:.3f}",
    )
    assert alpha - base > 2.0 and alpha - base > 5 * noise, (base, alpha, bravo, reference)

    # forget carol in the served store: alpha goes back and replays without her; bravo untouched
    work = tmp_path / "killed"
    shutil.copytree(store_dir, work)
    assert any(b"VX-7" in data for data in _sqlite_bytes(work).values())  # the checks below can fail
    capsys.readouterr()
    assert cli_main(["--store", str(store_dir), "--user", "carol", "--tenant", "alpha", *FLAGS]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [replay] = record["record"]["lineages"]["alpha"]["replayed"]
    assert replay["accepted"] and replay["replaces"] == learned["alpha"]["version"], record
    assert "carol" not in json.dumps(record) and record["record"]["counts"]["conversations"] == 1
    assert record["record"]["checkpoint"] == "complete"
    after = _margin(store_dir, "alpha", tok, probe)
    _say(capsys, f"after forget: alpha {after:.6f}, reference (never saw carol) {reference:.6f}")
    assert abs(after - reference) < 1e-5 and _adapter_bytes(store_dir, "alpha") == _adapter_bytes(ref, "alpha")
    assert _margin(store_dir, "bravo", tok, probe) == bravo
    assert not (store_dir / learned["alpha"]["candidate"]).exists()  # the adapter that learned the canary
    for f, data in _sqlite_bytes(store_dir).items():  # serve.sqlite, its WAL, the tenants' versions
        for gone in (b"VX-7", b"carol"):  # (bravo's own conversation asked the same question)
            assert gone not in data, (gone, f)

    # a forget SIGKILLed while it replays, resumed: the same adapter
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    users = ["--user", "carol", "--tenant", "alpha"]
    cmd = [sys.executable, "-m", "dostream.cli", "forget", "--store", str(work), *users, *FLAGS]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = None
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        try:
            db = db or sqlite3.connect(work / "serve.sqlite")
            row = db.execute("SELECT status FROM forgets ORDER BY id DESC LIMIT 1").fetchone()
        except sqlite3.OperationalError:
            row = None
        if row is not None and row[0] == "memory" and list((work / "tenants/alpha/adapters").glob("*-forget*")):
            break  # the streams are deleted, the memory forgotten, the replayed update is learning
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert db.execute("SELECT status FROM forgets").fetchall() == [("memory",)]  # killed part way
    db.close()
    assert cli_main(["--store", str(work), "--resume-only", *FLAGS]) == 0
    assert _adapter_bytes(work, "alpha") == _adapter_bytes(store_dir, "alpha")
    statuses = sqlite3.connect(work / "serve.sqlite").execute("SELECT status FROM forgets").fetchall()
    assert statuses == [("done",)]


def test_forget_user_takes_her_notes_and_counts_out_of_the_tenants_memory_file(tok, tmp_path, capsys):
    """`dostream forget --user --memory`: the note distilled from carol's conversations (the world's
    statement of the canary) and the counts of her using notes are gone from alpha's memory file and
    its WAL; dave's note stays. Distilled on the base model (no update: a note is admitted when it
    helps the model in force predict the world)."""
    store_dir, memory = tmp_path / "store", tmp_path / "memory"
    config = ServeConfig(model=MODEL, store=str(store_dir), limits=Limits(max_tokens=64), memory=str(memory))
    server = Server(config, env_key=KEY, tok=tok)
    a_key = server.store.add_key("a", ("admin",), "alpha")[1]
    with running(server) as url:
        _teach(url, a_key, "carol", [(QUESTION, f"The launch code is{CANARY}.")] * 4)
        _teach(
            url,
            a_key,
            "dave",
            [(f"When does the canteen open, day {i}?", "The canteen opens at nine.") for i in range(4)],
        )
        auth = {"Authorization": f"Bearer {a_key}"}
        r = httpx.post(url + "/v1/memory/distill", json={"wait": True}, headers=auth, timeout=600)
        _say(capsys, f"distill: {r.json()}")
        assert r.status_code == 200 and r.json()["admitted"] >= 1, r.text
        question = [{"role": "user", "content": QUESTION}]
        client(url, a_key).chat.completions.create(messages=question, user="carol", **ASK)  # retrieves, counts her
        notes = httpx.get(url + "/v1/memory", headers=auth).json()["data"]
    _say(capsys, f"notes: {[n['text'] for n in notes]}")
    files = _sqlite_bytes(memory)
    assert any(b"VX-7" in d for d in files.values()) and any(b"carol" in d for d in files.values()), files.keys()
    mem = sqlite3.connect(memory / "tenants/alpha/memory.sqlite")
    assert mem.execute("SELECT COUNT(*) FROM counts WHERE user = 'carol'").fetchone()[0] >= 1  # her use, counted
    mem.close()
    capsys.readouterr()
    assert cli_main(["--store", str(store_dir), "--memory", str(memory), "--user", "carol", "--tenant", "alpha"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["record"]["notes_forgotten"] >= 1, record
    mem = sqlite3.connect(memory / "tenants/alpha/memory.sqlite")
    assert mem.execute("SELECT COUNT(*) FROM counts WHERE user = 'carol'").fetchone() == (0,)
    assert mem.execute("SELECT COUNT(*) FROM links WHERE user = 'carol'").fetchone() == (0,)
    kept = [json.loads(a or "{}") for (a,) in mem.execute("SELECT admission FROM notes WHERE status = 'active'")]
    mem.close()
    assert any(b"canteen opens at nine" in d for d in _sqlite_bytes(memory).values())  # dave's note stays
    files = {**_sqlite_bytes(memory), **_sqlite_bytes(store_dir)}
    for f, data in files.items():
        assert b"VX-7" not in data, f
    for f, data in _sqlite_bytes(store_dir).items():
        assert b"carol" not in data, f
    # nor her stream ids ("alpha:carol#0.0": `user` names the conversation) in the admission record
    # of dave's kept note, among the streams it was tested on (Memory.forget rewrites it)
    assert "carol" not in json.dumps(kept)
    for f, data in _sqlite_bytes(memory).items():
        assert b"carol" not in data, f
