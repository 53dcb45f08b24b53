"""Export of the served conversations, SIGKILL at random points (nothing acknowledged lost, no half
row; on dostream's engine and on vLLM), --dtype auto, the serve benchmark's interleaving."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
from conftest import run_cli
from harness import (
    KEY,
    _free_port,
    client,
    running,
    serve_process,
)

from dostream.render import Renderer
from dostream.serve.app import ServeConfig, Server
from dostream.serve.store import ServeStore
from dostream.stream import read_streams


# -- export ----------------------------------------------------------------------------------------
def test_streams_export_writes_the_servers_conversations(served, tok, tmp_path):
    c = client(served.url)
    c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "export me"}], max_tokens=4)
    out = tmp_path / "served.jsonl"
    proc = run_cli("streams", "export", served.dir, "--out", out)
    assert "streams" in proc.stderr
    streams = list(read_streams(out))
    assert len(streams) >= served.store.n_exchanges() // 4 and all(s.meta["source"] == "serve" for s in streams)
    renderer = Renderer(tok, chat_template=True)
    for s in streams:  # every exported stream renders, sampled ids checked against their text
        renderer.render(s)


# (model, flags, start timeout): vLLM's CPU attention cannot run the tiny model (head size 8), and its
# engine takes about a minute to start (its compiled graph cached under ~/.cache/vllm).
ENGINES = {"dostream": ("tiny", (), 120), "vllm": ("smollm2", ("--model", "smollm2", "--engine", "vllm"), 400)}


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _client_loop(url: str, rng: random.Random, acked: dict, fb_acked: set, convs: list, stop: threading.Event, model):
    """Chat (new conversations, or the next turn of an acknowledged one) and feedback until the
    server dies; record what was acknowledged."""
    c = client(url)
    while not stop.is_set():
        try:
            if convs and rng.random() < 0.5:
                messages = [*rng.choice(convs), {"role": "user", "content": f"more {rng.random():.3f}"}]
            else:
                messages = [{"role": "user", "content": f"start {rng.random():.3f}"}]
            res = c.chat.completions.create(
                model=model, messages=messages, max_tokens=rng.randint(1, 12), seed=rng.randrange(99)
            )
            acked[res.id] = res.choices[0].message.content
            convs.append([*messages, res.choices[0].message.model_dump(exclude_none=True)])
            if rng.random() < 0.3:
                fb = c.post(
                    "/feedback",
                    body={"completion_id": res.id, "author": "verifier", "text": "ok", "reward": 1.0},
                    cast_to=object,
                )
                fb_acked.add(fb["id"])
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError):
            return


@pytest.mark.parametrize(
    "engine",
    [
        "dostream",
        pytest.param(
            "vllm",
            marks=[
                pytest.mark.slow,
                pytest.mark.vllm,
                pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
            ],
        ),
    ],
)
def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path, tok, engine):
    """Clients chatting while the server is SIGKILLed (twice): nothing acknowledged is lost, no half
    row; on vLLM its engine's processes end with the server. Restarted (on dostream's engine: the
    store is the same whichever engine wrote it), the server continues an acknowledged conversation."""
    model, flags, start_s = ENGINES[engine]
    rng = random.Random(21)
    store_dir = tmp_path / "store"
    acked: dict[str, str] = {}
    fb_acked: set[str] = set()
    convs: list[list[dict]] = []
    kills = int(os.environ.get("DOSTREAM_SERVE_KILLS", "2"))
    for _ in range(kills):
        port = _free_port()
        proc = serve_process(store_dir, port, *flags, start_s=start_s)
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=_client_loop,
                args=(f"http://127.0.0.1:{port}", random.Random(rng.random()), acked, fb_acked, convs, stop, model),
            )
            for _ in range(4)
        ]
        for t in clients:
            t.start()
        answered, deadline = len(acked), time.monotonic() + 60
        while len(acked) == answered and time.monotonic() < deadline:  # killed while answering
            time.sleep(0.05)
        time.sleep(rng.uniform(0.3, 1.5))
        engine_procs = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
        for t in clients:
            t.join(timeout=60)
        deadline = time.monotonic() + 60
        while (left := [p for p in engine_procs if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in left:  # leave nothing running, then say so
            os.kill(p, signal.SIGKILL)
        assert not left, f"the server's child processes outlived it: {left}"
    assert acked, "no request was acknowledged before the kills"
    db = sqlite3.connect(store_dir / "serve.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = ServeStore.open_dir(store_dir)
    rows = {cid: json.loads(req) for cid, req in store.db.execute("SELECT id, request FROM exchanges")}
    # no half row: every exchange has its samples and one continuation key per choice
    for seq, samples in store.db.execute("SELECT seq, samples FROM exchanges"):
        keys = store.db.execute("SELECT COUNT(*) FROM continuations WHERE seq = ?", (seq,)).fetchone()[0]
        assert keys == len(json.loads(samples)) >= 1
    for cid, content in acked.items():
        assert cid in rows, f"acknowledged {cid} was lost"
        assert rows[cid]["choices"][0]["message"]["content"] == content
    assert fb_acked <= set(store.feedback_ids())
    renderer = Renderer(tok, chat_template=True)
    exported = store.export_streams()
    for s in exported:
        renderer.render(s)
    store.close()
    # restarted, the server continues a conversation acknowledged before a kill
    server = Server(ServeConfig(model=model, store=str(store_dir)), env_key=KEY)
    with running(server) as url:
        last = convs[-1]
        raw = client(url).chat.completions.with_raw_response.create(
            model=model, messages=[*last, {"role": "user", "content": "after the restart"}], max_tokens=3
        )
        before = {e for e in rows if e in acked}
        assert raw.headers["x-conversation-id"] in {s.meta["conversation"] for s in exported}
        assert before


def test_dtype_auto_follows_the_measured_bf16_rate(tmp_path, monkeypatch, tok):
    """`--dtype auto`: bf16 where a bf16 matmul measures faster, fp32 where it is emulated; a
    forced bf16 on such a CPU warns with the measured rate."""
    import dostream.device as tr

    monkeypatch.setattr(tr.torch.cuda, "is_available", lambda: False)
    for rate, want in ((7.0, "bf16"), (0.006, "fp32")):
        monkeypatch.setattr(tr, "bf16_speedup", lambda device_type, rate=rate: rate)
        server = Server(ServeConfig(model="tiny", store=str(tmp_path / want), dtype="auto"), env_key=KEY, tok=tok)
        model = server.slot.get()[0]
        assert server.dtype == want
        assert next(model.parameters()).dtype == (torch.bfloat16 if want == "bf16" else torch.float32)
    with pytest.warns(UserWarning, match="emulated"):
        Server(ServeConfig(model="tiny", store=str(tmp_path / "forced"), dtype="bf16"), env_key=KEY, tok=tok)
    with pytest.raises(ValueError, match="--dtype"):
        ServeConfig(model="tiny", store=str(tmp_path), dtype="fp16")


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_the_serve_benchmark_interleaves_servers_and_pairs_their_runs(tmp_path):
    """`benchmarks/serve.py --interleave` on the tiny model: both servers (dostream's and `transformers
    serve`; its `--continuous-batching` takes the same path, 18 s slower to warm up) up at once, taking
    turns run by run in alternating order; every run answered; the table gives the paired ratio; the
    JSON names the machine and the settings."""
    from conftest import ROOT

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--model", "tiny", "--clients", "2"]
    cmd += ["--per-client", "2", "--max-tokens", "4", "--repeat", "2", "--interleave"]
    cmd += ["--servers", "dostream,transformers", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    ours, theirs = record["dostream serve"], record["transformers serve"]
    assert [r["requests"] for r in ours + theirs] == [4] * 4 and not any(r["n_errors"] for r in ours + theirs)
    assert all(r["decode"]["steps"] > 0 for r in ours)  # dostream's own account, from its /metrics
    # Round 0: dostream, then transformers; round 1: the other way round.
    order = sorted(
        (r["started_s"], name, r["repeat"])
        for name, rows in record.items()
        if name in ("dostream serve", "transformers serve")
        for r in rows
    )
    assert [(name, i) for _, name, i in order] == [
        ("dostream serve", 0),
        ("transformers serve", 0),
        ("transformers serve", 1),
        ("dostream serve", 1),
    ]
    assert record["settings"]["interleave"] is True and record["environment"]["cpu"]
    assert "| dostream serve's ratio to it | paired ratio |" in proc.stdout
