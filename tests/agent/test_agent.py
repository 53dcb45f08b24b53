"""The continual agent: store, support environment, gate, kill-and-resume, smoke runs of every env."""

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_AGENT, run_cli

from dostream.agent.loop import Agent, AgentConfig, run
from dostream.agent.probe import rule_probe
from dostream.agent.store import Store
from dostream.envs.registry import env_spec
from dostream.envs.support import GOALS, ITEMS, SERVICES, SupportEnv, SupportWorld, named_item, prompt_segments
from dostream.models import tiny_model
from dostream.render import Renderer
from dostream.stream import Segment, Stream, view_authors

TINY = TINY_AGENT


# -- store ----------------------------------------------------------------------------------


def _ep(i, ok=False):
    return Stream(f"e{i}", [Segment("context", "Q "), Segment("agent", "A", token_ids=[32])], {"success": ok})


def test_store_appends_in_order_and_refuses_gaps_and_repeats(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add_episodes([(0, _ep(0), None), (1, _ep(1, True), None)])
    with pytest.raises(RuntimeError, match="continue the sequence at 2"):
        store.add_episodes([(1, _ep(1), None)])
    with pytest.raises(RuntimeError):
        store.add_episodes([(3, _ep(3), None)])
    assert [s.id for s in store.episodes()] == ["e0", "e1"]
    assert store.episodes()[1].segments[1].token_ids == [32]  # exact agent ids survive the store
    assert store.successes() == [(0, False, None), (1, True, None)]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_names_the_adapter_in_force_with_the_update(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add_update(8, "a8", True, "ok", {})
    store.add_update(16, "a16", False, "regression", {})
    assert store.current_adapter() == "a8"  # a rejected update leaves the previous adapter in force
    assert [u["accepted"] for u in store.updates()] == [True, False]
    with pytest.raises(sqlite3.IntegrityError):
        store.add_update(16, "again", True, "ok", {})  # one update per boundary
    assert store.current_adapter() == "a8"


# -- support environment --------------------------------------------------------------------


def test_support_world_is_seeded_and_holds_out_one_goal_per_service():
    a, b, c = SupportWorld(0), SupportWorld(0), SupportWorld(1)
    assert a.requires == b.requires and a.requires != c.requires
    assert len(set(a.requires.values())) == len(ITEMS)  # every kind of detail is needed somewhere
    train, held = set(a.combos("train")), set(a.combos("heldout"))
    assert not train & held and len(held) == len(SERVICES) and len(train | held) == len(SERVICES) * len(GOALS)
    tasks = a.tasks("heldout", 20, seed=3)
    assert all((t.service, t.goal) in held for t in tasks)
    assert a.tasks("train", 5, seed=3) == a.tasks("train", 9, seed=3)[:5]


@pytest.mark.parametrize("reply", ["refusal", "framed"])
def test_support_episode_states_the_requirement_in_the_world_s_words(tok, reply):
    world = SupportWorld(0)
    task = world.tasks("train", 1, seed=0)[0]
    need = (
        ITEMS[task.required].name if reply == "refusal" else "have ready the user's " + ITEMS[task.required].words
    )  # the agent's own frame
    wrong = next(k for k in ITEMS if k != task.required)
    env = SupportEnv(world, reply)
    env.reset(task)
    fail = env.step(f" {ITEMS[wrong].phrase.format(task.details[wrong])}.\n")
    assert fail.reward == 0.0 and fail.done and not fail.info["success"]
    said = [s for s in fail.segments if s.author == "environment"]
    assert len(said) == 1 and need in said[0].text and named_item(said[0].text) == task.required
    # The requirement is world text: supervised under the interventional view, the agent's turn is not.
    stream = Stream("s", env.reset(task) + [Segment("agent", " account number.\n")] + fail.segments)
    r = Renderer(tok).render(stream)
    sup = r.supervised(view_authors("interventional"))
    assert any(s and a == "environment" for s, a in zip(sup, r.authors))
    assert not any(s and a == "agent" for s, a in zip(sup, r.authors))
    env.reset(task)
    assert env.step(f" {ITEMS[task.required].phrase.format('x')} and more\n").info["success"]


def test_support_framed_is_the_same_world_with_framed_replies():
    plain, framed = env_spec("support", 0), env_spec("support-framed", 0)
    assert (plain.describe["reply"], framed.describe["reply"]) == ("refusal", "framed")
    assert (
        plain.items("train", 8, 0) == framed.items("train", 8, 0)
        and plain.describe["rules"] == framed.describe["rules"]
    )


@pytest.mark.parametrize("reply", ["refusal", "framed"])
def test_rule_probe_matches_scoring_each_whole_sequence(tok, reply):
    """The probe runs each prefix once and repeats its cache; score every (prefix + words) in one
    plain forward instead and the likeliest kind must agree: asked with each kind as the required
    one, the probe must hit exactly for the kind the plain scoring ranks first."""
    torch.manual_seed(0)
    model = tiny_model(seed=3).eval()
    tasks = SupportWorld(0).tasks("heldout", 6, seed=1)
    for task in tasks:
        ctx = "".join(s.text for s in prompt_segments(task))
        frames = {"act": (ctx, {k: " " + it.words for k, it in ITEMS.items()})}
        frames["reply"] = (
            (
                f"{ctx} call details.\n{task.service}: I can't help with that. Next time, have ready the user's",
                frames["act"][1],
            )
            if reply == "framed"
            else (
                f"{ctx} call details.\n{task.service}: I can't help without",
                {k: " " + it.name for k, it in ITEMS.items()},
            )
        )
        best = {}
        for frame, (prefix, conts) in frames.items():
            p = tok(prefix, add_special_tokens=False)["input_ids"]
            scores = {}
            for kind, c in conts.items():
                ids = p + tok(c, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                scores[kind] = sum(logp[i - 1, ids[i]].item() for i in range(len(p), len(ids))) / (len(ids) - len(p))
            best[frame] = max(scores, key=scores.get)
        for kind in ITEMS:
            want = {"act": int(best["act"] == kind), "reply": int(best["reply"] == kind), "n": 1}
            assert rule_probe(model, tok, [dataclasses.replace(task, required=kind)], reply) == want


def test_named_item_takes_the_first_detail_named():
    assert named_item(" security PIN 1234 and the card ending 0000.") == "pin"
    assert named_item(" the account number, 1234-5678.\nDate of birth") == "account"  # one line only
    assert named_item(" I will call them now.") is None


# -- the loop -------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["support", "tutor", "stem"])
def test_smoke_every_environment(env, tmp_path):
    cfg = AgentConfig(env=env, **{**TINY, "max_new_tokens": 16 if env == "stem" else 8})
    summary = run(cfg, tmp_path / env)
    assert summary["episodes"] == 16
    assert [u["after_episodes"] for u in summary["updates"]] == [8]
    assert [e["after_episodes"] for e in summary["evals"]] == [0, 8, 16]
    store = Store(tmp_path / env / "store.sqlite")
    streams = store.episodes()
    assert [s.meta["seq"] for s in streams] == list(range(16))
    agent_segs = [seg for s in streams for seg in s.segments if seg.author == "agent"]
    assert agent_segs and all(seg.token_ids for seg in agent_segs)
    # episodes after the update acted with the adapter the update put in force
    assert {a for seq, _, a in store.successes() if seq >= 8} == {store.current_adapter()}


def test_gate_restores_the_previous_adapter_on_a_regression(tmp_path, monkeypatch):
    """Force a regression: the adapter in force solves every control item, any candidate none."""
    real = Agent.successes

    def rigged(self, adapter, items, tag):
        if tag == "control":
            return [adapter is None] * len(items)
        return real(self, adapter, items, tag)

    monkeypatch.setattr(Agent, "successes", rigged)
    out = tmp_path / "gated"
    summary = run(AgentConfig(env="support", **{**TINY, "episodes": 24}), out)
    ups = summary["updates"]
    assert [u["accepted"] for u in ups] == [False, False]
    assert all("regression, previous adapter restored" in u["reason"] for u in ups)
    assert all(u["current"] is None for u in ups)
    store = Store(out / "store.sqlite")
    assert store.current_adapter() is None
    assert {a for _, _, a in store.successes()} == {None}  # every episode acted with the base model
    # the rejected candidates are kept on disk for inspection, but nothing points at them
    assert (out / "adapters" / "update-000008" / "adapter").is_dir()


def _agent_cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "dostream.cli",
        "agent",
        "run",
        "--env",
        "support",
        "--model",
        "tiny",
        "--out",
        str(out),
        "--learners",
        "interventional",
        "--episodes",
        "24",
        "--update-every",
        "8",
        "--eval-every",
        "8",
        "--eval-n",
        "3",
        "--gate-control",
        "3",
        "--gate-learned",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--no-progress",
        "--no-report",
        *extra,
    ]


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_sigkill_mid_update_loses_and_repeats_no_episode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_agent_cmd(tmp_path / "a"), check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen(_agent_cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    started = tmp_path / "b" / "interventional" / "adapters" / "update-000016" / "config.json"
    deadline = time.time() + 240
    while time.time() < deadline and not started.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "b" / "interventional" / "store.sqlite")
    assert store.n_episodes() == 16 and not store.has_update(16), "the kill did not land inside the second update"
    store.close()
    refused = subprocess.run(_agent_cmd(tmp_path / "b"), capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    subprocess.run(_agent_cmd(tmp_path / "b", "--resume"), check=True, capture_output=True, env=env, timeout=300)

    a, b = (Store(tmp_path / x / "interventional" / "store.sqlite") for x in "ab")
    seqs = [r[0] for r in b.db.execute("SELECT seq FROM episodes ORDER BY seq")]
    assert seqs == list(range(24))
    assert [u["after_episodes"] for u in b.updates()] == [8, 16]
    # the resumed run redid the update and acted exactly as the uninterrupted run did
    assert [s.to_json() for s in a.episodes()] == [s.to_json() for s in b.episodes()]


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_cli_runs_three_loops_writes_a_report_and_exports_streams(tmp_path):
    out = tmp_path / "cmp"
    run_cli(
        "agent",
        "run",
        "--env",
        "support",
        "--model",
        "tiny",
        "--out",
        out,
        "--episodes",
        "16",
        "--update-every",
        "8",
        "--eval-every",
        "8",
        "--eval-n",
        "2",
        "--gate-control",
        "2",
        "--gate-learned",
        "1",
        "--epochs",
        "1",
        "--max-new-tokens",
        "6",
        "--no-progress",
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["interventional", "observational", "none"]
    assert results["arms"]["none"]["updates"] == {"accepted": 0, "rejected": 0, "rejections": []}
    assert (out / "success.png").stat().st_size > 10_000
    assert "No learning" in (out / "report.md").read_text()
    probe = results["rule_probe"]  # the base model and the two learning loops' final adapters
    assert set(probe["models"]) == {"base", "interventional", "observational"}
    assert all(0 <= p["act"] <= p["n"] == 48 and 0 <= p["reply"] <= 48 for p in probe["models"].values())
    assert "Does the agent know the rules?" in (out / "report.md").read_text()
    run_cli("report", out)  # the report rebuilds from the stores alone (the probe from its cache)
    exported = tmp_path / "ep.jsonl"
    run_cli("streams", "export", out / "interventional", "--out", exported)
    lines = exported.read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["id"] == "ep-000000"
    shown = run_cli("show", exported, "--tokenizer", "tiny")
    assert "environment" in shown.stdout
    missing = run_cli("streams", "export", tmp_path / "nowhere", check=False)
    assert missing.returncode == 2 and "store.sqlite" in missing.stderr


def test_export_never_writes_to_a_store_and_refuses_foreign_files(tmp_path):
    import sqlite3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    db = sqlite3.connect(foreign / "store.sqlite")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    before = (foreign / "store.sqlite").read_bytes()
    proc = run_cli("streams", "export", foreign, check=False)
    assert proc.returncode == 2 and "not a dostream store (no table" in proc.stderr
    assert (foreign / "store.sqlite").read_bytes() == before  # no tables made, no WAL switched on
    assert sorted(p.name for p in foreign.iterdir()) == ["store.sqlite"]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "store.sqlite").write_text("not sqlite")
    proc = run_cli("streams", "export", garbage, check=False)
    assert proc.returncode == 2 and "not a dostream store" in proc.stderr and "Traceback" not in proc.stderr
    # A real store is read without being changed either.
    real = tmp_path / "real"
    real.mkdir()
    store = Store(real / "store.sqlite")
    store.add_episodes([(0, _ep(0), None)])
    store.close()
    before = (real / "store.sqlite").read_bytes()
    out = run_cli("streams", "export", real).stdout
    assert json.loads(out.splitlines()[0])["id"] == "e0" and (real / "store.sqlite").read_bytes() == before


def test_a_damaged_row_is_an_error_naming_the_store_the_row_and_the_field(tmp_path):
    """A row damaged inside a real store (not JSON; a bad field): `streams export` names the store
    file, the row and the field, exits 2, and changes nothing in the file."""
    from dostream.serve.store import Exchange, ServeStore

    cases = {
        "notjson": "{not json",
        "badfield": json.dumps({"id": "x", "segments": [{"author": "nobody", "text": "hi"}]}),
    }
    for name, bad in cases.items():
        d = tmp_path / name
        d.mkdir()
        store = Store(d / "store.sqlite")
        store.add_episodes([(0, _ep(0), None), (1, _ep(1), None)])
        store.db.execute("UPDATE episodes SET stream = ? WHERE seq = 1", (bad,))
        store.close()
        before = (d / "store.sqlite").read_bytes()
        proc = run_cli("streams", "export", d, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{d / 'store.sqlite'} (episodes, seq 1)" in proc.stderr
        assert ("not valid JSON" if name == "notjson" else "'segments[0].author'") in proc.stderr
        assert (d / "store.sqlite").read_bytes() == before
    served = tmp_path / "served"
    store = ServeStore.open_dir(served)
    seg = Segment("user", "hello", role="user")
    store.add_exchanges(
        [Exchange("chatcmpl-1", "c1", None, None, [seg], [Segment("agent", "hi", [1])], {}, None, None)]
    )
    store.db.execute("UPDATE exchanges SET samples = ?", (json.dumps([{"author": "agent", "text": 5}]),))
    store.close()
    proc = run_cli("streams", "export", served, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "(exchanges, seq " in proc.stderr and "field '[0].text': expected str, got int" in proc.stderr


def test_export_reads_a_store_on_a_read_only_mount(tmp_path):
    """A store on a real read-only mount (a read-only bind mount; skipped where mounting is not
    permitted): SQLite cannot create the WAL's shared-memory file there, and the store is opened
    immutable instead."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    store = Store(src / "store.sqlite")
    store.add_episodes([(0, _ep(0), None), (1, _ep(1), None)])
    store.close()
    mounted = subprocess.run(["mount", "--bind", src, ro], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", ro], capture_output=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.decode().strip()}")
        assert subprocess.run(["touch", ro / "probe"], capture_output=True).returncode != 0  # really read-only
        proc = run_cli("streams", "export", ro, check=False)
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(x)["id"] for x in proc.stdout.splitlines()] == ["e0", "e1"]
    finally:
        subprocess.run(["umount", ro], capture_output=True)
