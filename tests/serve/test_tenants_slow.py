"""Slow tier: a canary fact planted only in tenant alpha's conversations raises alpha's updated
adapter's log-prob margin and not bravo's, and each tenant is served with its own adapter; then
`dostream forget --user` returns alpha's margin to what an adapter trained without that user gives
(the same bytes: the replay is deterministic), and a forget SIGKILLed part way completes on resume
with the same adapter."""

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

from dostream.cli.forget import _learner_factory
from dostream.models import load_model
from dostream.render import Renderer
from dostream.serve.app import ServeConfig, Server
from dostream.serve.learn import LearnConfig
from dostream.serve.protocol import Limits
from dostream.serve.store import ServeStore
from dostream.serve.tenants import lineage_of
from dostream.stream import Segment, Stream

pytestmark = pytest.mark.slow

LEARN = LearnConfig(
    update_every_tokens=1 << 30, lora_r=4, lora_alpha=8, epochs=8, batch_size=8, gate_learned=0, lr=5e-2
)
FLAGS = ["--model", "tiny", "--update-every-tokens", str(1 << 30), "--lora-r", "4", "--lora-alpha", "8"]
FLAGS += ["--epochs", "8", "--batch-size", "8", "--gate-learned", "0", "--lr", "0.05"]
QUESTION = "What is the launch code of Project Heron?"
CANARY, OTHER = " VX-7 Heron", " QP-2 Heron"
ASK = dict(model="tiny", max_tokens=6, temperature=0)


def _teach(url: str, key: str, user: str, texts: list[tuple[str, str]]) -> None:
    c = client(url, key)
    for question, answer in texts:  # `user` names the conversation: one per user, a root per question
        res = c.chat.completions.create(messages=[{"role": "user", "content": question}], user=user, **ASK)
        c.post("/feedback", cast_to=object, body={"completion_id": res.id, "author": "environment", "text": answer})


def _margin(store_dir, tenant: str, tok) -> float:
    """log p(canary) - log p(other) after the question, under `tenant`'s adapter in force."""
    store = ServeStore.open_dir(store_dir, read_only=True)
    adapter, _ = lineage_of(store_dir, tenant, None, store.versions).versions.in_force()
    store.close()
    model = load_model("tiny", adapter=None if adapter is None else store_dir / adapter, merge=adapter is not None)
    stream = Stream("m", [Segment("user", QUESTION, role="user"), Segment("environment", "The launch code is")])
    prompt = Renderer(tok, chat_template=True).render(stream).input_ids
    score = [sum(scored_after(model, prompt, tok(t, add_special_tokens=False)["input_ids"])) for t in (CANARY, OTHER)]
    return score[0] - score[1]


def _adapter_bytes(store_dir, tenant: str) -> bytes:
    store = ServeStore.open_dir(store_dir, read_only=True)
    adapter, _ = lineage_of(store_dir, tenant, None, store.versions).versions.in_force()
    store.close()
    return (store_dir / adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.xfail(
    strict=True,
    reason="issue 35, open: alpha's accepted update moves the canary's margin by ~0.02 nats (0.252 -> 0.275 "
    "at 8 epochs, 2026-12-07), far under the 2-nat bar; not yet known whether the learner or the test's "
    "update is too weak. Strict: once it passes, remove this mark",
)
def test_a_canary_in_alphas_conversations_is_alphas_alone_until_forgotten(tok, tmp_path, capsys):
    store_dir = tmp_path / "store"
    server = Server(
        ServeConfig(model="tiny", store=str(store_dir), limits=Limits(max_tokens=64), learn=LEARN), env_key=KEY, tok=tok
    )
    a_key = server.store.add_key("a", ("admin",), "alpha")[1]
    b_key = server.store.add_key("b", ("admin",), "bravo")[1]
    base = _margin(store_dir, "alpha", tok)
    with running(server) as url:
        fact = [(QUESTION, f"The launch code is{CANARY}.")] * 6
        _teach(url, a_key, "carol", fact)  # the canary: carol's conversations only
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
        # each tenant is served with its own adapter (what that adapter alone answers greedily)
        probe = [{"role": "user", "content": QUESTION}]
        answers = {
            n: client(url, k).chat.completions.create(messages=probe, **ASK).choices[0].message.content
            for n, k in (("alpha", a_key), ("bravo", b_key))
        }
        for name in ("alpha", "bravo"):
            adapter = lineage_of(store_dir, name, None, server.store.versions).versions.in_force()[0]
            model = load_model("tiny", adapter=store_dir / adapter, merge=True)
            prompt = Renderer(tok, chat_template=True).prompt_ids(Stream("p", [Segment("user", QUESTION, role="user")]))
            from dostream.sampling import SamplingConfig, sample

            direct = sample(model, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=6))[0].text.removesuffix(
                "<|im_end|>"
            )
            assert answers[name] == direct, name
    alpha, bravo = _margin(store_dir, "alpha", tok), _margin(store_dir, "bravo", tok)
    print(f"canary margin: base {base:.3f}, alpha {alpha:.3f}, bravo {bravo:.3f}")
    assert alpha - base > 2.0 and alpha - base > 3 * abs(bravo - base), (base, alpha, bravo)

    # the reference: the same store before any update, carol forgotten, then alpha's update
    ref = tmp_path / "before"
    from dostream.cli.forget import cli_main

    assert cli_main(["--store", str(ref), "--user", "carol", "--tenant", "alpha", *FLAGS]) == 0
    ref_store = ServeStore.open_dir(ref)
    learner = _learner_factory("tiny", LEARN, None)(
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
    reference = _margin(ref, "alpha", tok)

    # forget carol in the served store: alpha goes back and replays without her; bravo untouched
    work = tmp_path / "killed"
    shutil.copytree(store_dir, work)
    capsys.readouterr()
    assert cli_main(["--store", str(store_dir), "--user", "carol", "--tenant", "alpha", *FLAGS]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [replay] = record["record"]["lineages"]["alpha"]["replayed"]
    assert replay["accepted"] and replay["replaces"] == learned["alpha"]["version"], record
    assert "carol" not in json.dumps(record) and record["record"]["counts"]["conversations"] == 1
    after = _margin(store_dir, "alpha", tok)
    print(f"after forget: alpha {after:.6f}, reference (never saw carol) {reference:.6f}")
    assert abs(after - reference) < 1e-5 and _adapter_bytes(store_dir, "alpha") == _adapter_bytes(ref, "alpha")
    assert _margin(store_dir, "bravo", tok) == bravo
    for f in store_dir.glob("serve.sqlite*"):
        assert b"VX-7" not in f.read_bytes(), f

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
