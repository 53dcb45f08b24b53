"""`dostream serve --learn` against real servers on 127.0.0.1 (tiny model): an update swapped in
under 16 concurrent clients with no failed request, the gate rejecting a forced regression,
rollback, SIGKILL in the middle of an update then a restart, `/metrics` parsed by the Prometheus
client's own parser; and the pieces: served conversations handed to the learners render as the
server rendered them, the control file's errors name file, line and field."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from types import SimpleNamespace

import httpx
import pytest
from harness import KEY, _free_port, client, running, serve_process, wait_for

from dostream.models import load_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.serve.app import ServeConfig, Server
from dostream.serve.learn import LearnConfig, as_plain, read_control
from dostream.serve.protocol import Limits
from dostream.stream import Segment, Stream

AUTH = {"Authorization": f"Bearer {KEY}"}
# Small, fast updates: the tiny model, rank 4, one pass.
FAST = LearnConfig(update_every_tokens=1 << 30, lora_r=4, lora_alpha=8, epochs=1, batch_size=8, gate_learned=0)
ASK = dict(model="tiny", max_tokens=8, temperature=0)


def _learn(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/learn", json={"wait": True, **body}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _chat(url: str, text: str, **kw):
    return client(url).chat.completions.create(messages=[{"role": "user", "content": text}], **{**ASK, **kw})


def _teach(url: str, n: int, tag: str = "") -> None:
    """n conversations, each with the world's answer as feedback (what an update learns from)."""
    for i in range(n):
        res = _chat(url, f"Which detail does Skyway Airlines want? {tag}{i}", temperature=0.7, seed=i)
        client(url).post(
            "/feedback",
            cast_to=object,
            body={
                "completion_id": res.id,
                "author": "environment",
                "text": "Skyway Airlines wants the booking reference.",
            },
        )


@functools.cache
def _base_model():
    return load_model("tiny")


def _direct(adapter, tok, *texts: str) -> list[str]:
    """What the tiny model with `adapter` merged answers greedily to each of `texts` (one batch),
    sampled here, not served."""
    model = _base_model() if adapter is None else load_model("tiny", adapter=adapter, merge=True)
    renderer = Renderer(tok, chat_template=True)
    prompts = [renderer.prompt_ids(Stream("p", [Segment("user", t, role="user")])) for t in texts]
    out = sample(model, tok, prompts, SamplingConfig(greedy=True, max_new_tokens=8))
    return [s.text.removesuffix("<|im_end|>") for s in out]


# -- the pieces ------------------------------------------------------------------------------------
def test_a_served_conversation_reaches_the_learners_as_the_server_rendered_it(tok):
    """`as_plain`: the learners render plain; its plain rendering is the chat rendering (+ EOS),
    labels included, sampled ids kept."""
    sampled = tok("I have the booking reference.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = Stream(
        "c",
        [
            Segment("context", "You phone customer services.", role="system"),
            Segment("user", "Calling Skyway Airlines.", role="user"),
            Segment("agent", tok.decode(sampled), token_ids=sampled, role="assistant"),
            Segment("environment", "Skyway Airlines: thank you."),
        ],
    )
    chat = Renderer(tok, chat_template=True).render(stream)
    plain_stream = as_plain(stream, Renderer(tok, chat_template=True))
    plain = Renderer(tok).render(plain_stream)
    assert plain.input_ids[: len(chat)] == chat.input_ids and len(plain) == len(chat) + 1
    for view in ("interventional", "observational"):
        assert plain.labels(view)[: len(chat)] == chat.labels(view)
    [agent] = [s for s in plain_stream.segments if s.token_ids]
    assert agent.token_ids == sampled


def test_reward_groups_are_the_rewarded_choices_of_one_request():
    from dostream.serve.learn import reward_groups

    def leaf(sid, last, reward=None):
        return Stream(
            sid, [Segment("user", "x")], {"completions": ["a", last], **({} if reward is None else {"reward": reward})}
        )

    streams = [leaf("c1", "k1", 1.0), leaf("c2", "k2"), leaf("c1#0.1", "k1", 0.0), leaf("c3", "k3", 1.0)]
    streams += [
        leaf("c4", "k4", 0.0),
        leaf("c4#1.1", "k4", 1.0),
        leaf("c5", "k5", 1),
        leaf("c5#1", "k5"),
        leaf("c5#2", "k5", 0),
    ]
    grouped, rest, k = reward_groups(streams)
    assert k == 2 and [s.id for s in grouped] == ["c1", "c1#0.1", "c4", "c4#1.1"]
    assert [s.meta["group"] for s in grouped] == ["k1", "k1", "k4", "k4"]
    assert sorted(s.id for s in rest) == ["c2", "c3", "c5", "c5#1", "c5#2"]  # unrewarded choice: no group


BAD_CONTROL = [
    ("{not json", "1: not JSON"),
    ('{"messages": [], "expect": ["x"]}', "1: field 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}], "expect": ["x"]}', "1: field 'messages[0].role'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "1: field 'expect'"),
    ('{"messages": [{"role": "user", "content": "x"}], "expect": [""]}', "1: field 'expect[0]'"),
    ('{"messages": [{"role": "user", "content": "x"}], "expect": "x", "max_tokens": -1}', "1: field 'max_tokens'"),
    ('{"messages": [{"role": "user", "content": "x"}], "expect": "x", "verifier": "y"}', "1: field 'verifier'"),
]


@pytest.mark.parametrize("line,error", BAD_CONTROL, ids=[e for _, e in BAD_CONTROL])
def test_a_bad_control_line_names_file_line_and_field(tmp_path, line, error):
    path = tmp_path / "control.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError) as e:
        read_control(path)
    assert str(e.value).startswith(f"{path}:{error}"), str(e.value)
    path.write_text('{"messages": [{"role": "user", "content": "x"}], "expect": ["y"]}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_control(path)


# -- a learning server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learning(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("learn")
    cfg = ServeConfig(model="tiny", store=str(store), limits=Limits(max_tokens=64), learn=replace(FAST, lr=5e-2))
    server = Server(cfg, env_key=KEY, tok=tok)
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, store=server.store, dir=store)


def test_an_update_swaps_in_under_16_concurrent_clients_without_a_failed_request(learning, tok):
    url = learning.url
    assert _learn(url)["status"] == "nothing to learn"
    _teach(url, 6)
    probe = "Tell me about the weather"
    before = _chat(url, probe).choices[0].message.content
    assert [before] == _direct(None, tok, probe)
    stop, failures, answered = threading.Event(), [], []

    def hammer(i: int) -> None:
        c = client(url)
        k = 0
        while not stop.is_set():
            try:
                res = c.chat.completions.create(
                    messages=[{"role": "user", "content": f"client {i} asks {k}"}],
                    seed=k,
                    **{**ASK, "temperature": 1.0},
                )
                answered.append(res.id)
            except Exception as e:  # any failure at all counts
                failures.append(repr(e))
            k += 1

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answered) >= 16 or failures)  # answers drawn before the update
        result = _learn(url)
        # requests keep coming after the swap: past the (at most 16) in flight at it, 32 more,
        # so that at least 16 are checked below to be the new adapter's
        after = len(answered)
        wait_for(lambda: len(answered) >= after + 48 or failures)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert result["status"] == "accepted" and result["version"] == 1, result
    assert result["reason"].startswith("no gate")
    assert not failures, failures[:3]
    adapter = result["candidate"]
    assert adapter == "adapters/update-000001/adapter" and (learning.dir / adapter / "adapter_config.json").exists()
    # every answer was recorded, with the adapter that drew it: the old one, then the new one
    rows = dict(learning.store.db.execute("SELECT id, adapter FROM exchanges"))
    drawn = [rows[cid] for cid in answered]
    assert set(drawn) == {None, adapter}, set(drawn)
    first = drawn.index(adapter)
    assert first > 0 and len(drawn) >= first + 32 and None not in drawn[first + 16 :], (first, len(drawn))
    # what is served now is the candidate, merged: the same greedy answer as sampling it here
    assert [_chat(url, probe).choices[0].message.content] == _direct(learning.dir / adapter, tok, probe)
    listing = httpx.get(url + "/v1/adapters", headers=AUTH).json()
    assert listing["current"] == {"version": 1, "adapter": adapter}
    assert [v["version"] for v in listing["data"]] == [0, 1] and listing["data"][1]["accepted"]
    [row] = learning.store.versions.rows()
    assert row["current"] == adapter and row["metrics"]["conversations/new"] >= 6


def test_rollback_restores_a_previous_version(learning, tok):
    url = learning.url
    assert learning.store.versions.in_force()[1] == 1, "runs after the swap test"
    probe = "Tell me about the weather"
    r = httpx.post(url + "/v1/adapters/rollback", json={}, headers=AUTH)
    assert r.status_code == 200 and r.json()["current"] == {"version": 0, "adapter": None}, r.text
    assert [_chat(url, probe).choices[0].message.content] == _direct(None, tok, probe)
    assert learning.server.slot.get()[1] is None
    r = httpx.post(url + "/v1/adapters/rollback", json={}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["param"] == "version"  # nothing older than 0
    r = httpx.post(url + "/v1/adapters/rollback", json={"version": 7}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["param"] == "version"
    r = httpx.post(url + "/v1/adapters/rollback", json={"version": "1"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "version"
    _, chat_key = learning.store.add_key("chat only", ("chat",))
    r = httpx.post(url + "/v1/adapters/rollback", json={"version": 1}, headers={"Authorization": f"Bearer {chat_key}"})
    assert r.status_code == 403  # admin only; so is /v1/learn
    assert httpx.post(url + "/v1/learn", json={}, headers={"Authorization": f"Bearer {chat_key}"}).status_code == 403
    r = httpx.post(url + "/v1/adapters/rollback", json={"version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["current"]["version"] == 1
    adapter = "adapters/update-000001/adapter"
    assert learning.server.slot.get()[1] == adapter
    listing = httpx.get(url + "/v1/adapters", headers=AUTH).json()
    assert listing["current"]["version"] == 1 and len(listing["rollbacks"]) == 2
    assert learning.store.versions.in_force() == (adapter, 1)


def test_metrics_parse_with_the_prometheus_parser(learning):
    from prometheus_client.parser import text_string_to_metric_families

    url = learning.url
    _chat(url, "count me")
    assert httpx.get(url + "/metrics").status_code == 401
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["dostream_request_latency_seconds"].type == "histogram"
    chats = samples[("dostream_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))]
    assert chats >= 1
    count = samples[("dostream_request_latency_seconds_count", (("route", "/v1/chat/completions"),))]
    assert count >= chats
    assert samples[("dostream_exchanges_total", ())] == learning.store.n_exchanges()
    completion = learning.store.db.execute(
        "SELECT SUM(json_extract(request, '$.usage.completion_tokens')) FROM exchanges"
    ).fetchone()[0]
    assert samples[("dostream_tokens_total", (("kind", "completion"),))] == completion
    assert samples[("dostream_updates_total", (("result", "accepted"),))] == 1
    assert samples[("dostream_adapter_version", ())] == learning.store.versions.in_force()[1]
    assert ("dostream_requests_total", (("route", "unmatched"), ("status", "404"))) not in samples
    # The sampling thread: every step timed, the rows each carried, the prefills; idle now.
    batcher = learning.server.batcher
    steps = samples[("dostream_decode_step_seconds_count", ())]
    assert families["dostream_decode_step_seconds"].type == "histogram" and steps == batcher.steps >= 1
    assert 0 < samples[("dostream_decode_step_seconds_sum", ())] == pytest.approx(batcher.step_seconds)
    assert samples[("dostream_decode_rows_total", ())] == batcher.step_rows >= steps  # a step carries a row or more
    assert 1 <= samples[("dostream_decode_join_steps_total", ())] == batcher.join_steps <= steps
    assert samples[("dostream_rows_running", ())] == samples[("dostream_rows_waiting", ())] == 0
    httpx.get(url + "/v1/no/such/route", headers=AUTH)
    again = httpx.get(url + "/metrics", headers=AUTH).text
    assert 'route="unmatched",status="404"' in again and "/v1/no/such/route" not in again


def test_the_gate_rejects_a_forced_regression_and_keeps_the_adapter_in_force(tok, tmp_path):
    """Control answers the served model gives now; a candidate trained with a huge learning rate
    cannot give them: rejected, the reason recorded, the model in force unchanged."""
    prompts = [f"Control question {i}" for i in range(4)]
    control = tmp_path / "control.jsonl"
    lines = []
    for p, answer in zip(prompts, _direct(None, tok, *prompts)):  # the tiny model's answers: blank lines
        check = {"messages": [{"role": "user", "content": p}], "expect": [answer[:8]], "max_tokens": 8}
        lines.append(json.dumps(check))
    control.write_text("\n".join(lines) + "\n")
    learn = replace(FAST, lr=1.0, epochs=2, control=str(control))
    server = Server(ServeConfig(model="tiny", store=str(tmp_path / "store"), learn=learn), env_key=KEY, tok=tok)
    with running(server) as url:
        _teach(url, 4)
        model = server.slot.get()[0]
        result = _learn(url)
        assert result["status"] == "rejected" and "regression" in result["reason"], result
        assert result["gate"]["before"] == 1.0 and result["gate"]["after"] < 1.0
        assert server.slot.get()[0] is model and server.store.versions.in_force() == (None, 0)
        assert [c["id"] for c in result["gate"]["checks"]] == [f"control-{i}" for i in range(1, 5)]
        assert _learn(url)["status"] == "nothing to learn"  # a rejected update's conversations were seen
        listing = httpx.get(url + "/v1/adapters", headers=AUTH).json()
        assert listing["current"]["version"] == 0 and listing["data"][1]["reason"] == result["reason"]


def test_a_server_without_learn_refuses_learn_and_still_lists(served_plain):
    r = httpx.post(served_plain + "/v1/learn", json={}, headers=AUTH)
    assert r.status_code == 409 and "--learn" in r.json()["error"]["message"]
    listing = httpx.get(served_plain + "/v1/adapters", headers=AUTH).json()
    assert listing["learning"] is False and listing["current"]["version"] == 0


@pytest.fixture
def served_plain(tok, tmp_path):
    server = Server(ServeConfig(model="tiny", store=str(tmp_path / "plain")), env_key=KEY, tok=tok)
    with running(server) as url:
        yield url


# -- SIGKILL in the middle of an update ------------------------------------------------------------
# How the killed server and its restart learn: `dostream serve` flags, and the same as a LearnConfig.
# Two epochs: an update lasts long enough to be caught in the middle.
KILLED = dict(lora_r=4, lora_alpha=8, epochs=2, gate_learned=0)


def _serve(store, port: int, every: int) -> subprocess.Popen:
    flags = [
        "--learn",
        "--update-every-tokens",
        str(every),
        *(f"--{k.replace('_', '-')}={v}" for k, v in KILLED.items()),
    ]
    return serve_process(store, port, *flags)


def _listing(url: str) -> dict:
    return httpx.get(url + "/v1/adapters", headers=AUTH, timeout=10).json()


@contextlib.contextmanager
def _restarted(store, how: str, tok):
    """The server restarted on `store`, updating only when asked (to look first): a new `dostream
    serve` process, or a `Server` built here on the store, which is what `serve` runs (the
    killed process was real; this saves a second interpreter's start)."""
    if how == "subprocess":
        port = _free_port()
        proc = _serve(store, port, every=1 << 30)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    else:
        learn = LearnConfig(update_every_tokens=1 << 30, **KILLED)
        with running(Server(ServeConfig(model="tiny", store=str(store), learn=learn), env_key=KEY, tok=tok)) as url:
            yield url


@pytest.mark.parametrize("restart", ["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_sigkill_during_an_update_then_restart_serves_the_last_accepted_adapter(tmp_path, tok, restart):
    store = tmp_path / "store"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(store, port, every=20)
    try:
        _teach(url, 1, "a")  # enough new supervised tokens: the learner starts on its own
        wait_for(lambda: _listing(url)["current"]["version"] >= 1)
        wait_for(lambda: _listing(url)["running"] is None)
        _teach(url, 3, "b")
        interrupted = wait_for(lambda: _listing(url)["running"])
        half = store / "adapters" / f"update-{interrupted['version']:06d}"
        wait_for(lambda: half.exists())  # inside the update: training has begun writing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    db = sqlite3.connect(store / "serve.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT id, accepted, current, current_version FROM versions ORDER BY id").fetchall()
    db.close()
    assert [r[0] for r in rows] == list(range(1, interrupted["version"]))  # the killed update left no row
    in_force = (rows[-1][2], rows[-1][3])
    assert in_force[1] >= 1 and half.exists()
    with _restarted(store, restart, tok) as url:
        assert not half.exists()  # the interrupted update was discarded
        first = _listing(url)
        assert (
            first["current"] == {"version": in_force[1], "adapter": in_force[0]} and len(first["data"]) == len(rows) + 1
        )
        res = _chat(url, "after the restart")
        [adapter] = (
            sqlite3.connect(store / "serve.sqlite")
            .execute("SELECT adapter FROM exchanges WHERE id = ?", (res.id,))
            .fetchone()
        )
        assert adapter == in_force[0]  # the last accepted adapter serves
        redo = _learn(url)  # redone: the conversations it had not recorded as seen are still new
        assert redo["status"] == "accepted" and redo["version"] == interrupted["version"], redo
        assert redo["metrics"]["conversations/new"] >= interrupted["new"] + 1
        assert _listing(url)["current"]["version"] == interrupted["version"]


def test_serve_dtype_auto_learns_through_an_accepted_update_and_serves_what_is_in_force(tmp_path):
    """`dostream serve --dtype auto --learn` (`--dtype`: the old spelling of `--precision`; the
    learner once mapped the flag as typed and raised KeyError 'auto'): an accepted update, then the
    adapter the versions say is in force is the one the next exchange was drawn with."""
    store, port = tmp_path / "store", _free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["--dtype", "auto", "--learn", "--update-every-tokens", str(1 << 30)]
    proc = serve_process(store, port, *flags, "--lora-r", "4", "--lora-alpha", "8", "--epochs", "1")
    try:
        _teach(url, 3)
        result = _learn(url)
        assert result["status"] == "accepted" and result["version"] == 1, result
        listing = _listing(url)
        assert listing["current"] == {"version": 1, "adapter": result["candidate"]}
        res = _chat(url, "which adapter answers?")
        db = sqlite3.connect(store / "serve.sqlite")
        [served] = db.execute("SELECT adapter FROM exchanges WHERE id = ?", (res.id,)).fetchone()
        [in_force] = db.execute("SELECT current FROM versions ORDER BY id DESC LIMIT 1").fetchone()
        db.close()
        assert served == in_force == result["candidate"]
        assert (store / result["candidate"] / "adapter_config.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# -- the demonstration, as a smoke test ------------------------------------------------------------
@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_the_serve_learn_demonstration_runs_on_the_tiny_model(tmp_path):
    """`benchmarks/serve_learn.py`: both servers answer the same calls; the learning one updates."""
    from conftest import ROOT

    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_learn.py"), "--model", "tiny", "--calls", "4"]
    cmd += ["--wave", "4", "--eval-every", "4", "--heldout", "2", "--control", "1", "--sync", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    learn, plain = results["arms"]["learn"], results["arms"]["no-learn"]
    assert [p["calls"] for p in learn["points"]] == [p["calls"] for p in plain["points"]] == [0, 4]
    assert len(learn["calls"]) == len(plain["calls"]) == 4
    assert learn["updates"] and learn["points"][-1]["version"] >= 1 and plain["points"][-1]["version"] == 0
    assert (out / "curve.png").stat().st_size > 0 and "| calls | no-learn | learn |" in proc.stdout
