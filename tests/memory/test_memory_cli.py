"""`dostream memory`: distill, list, show, query, forget as a user runs them; bad input is one
line naming the file, line and field, and nothing stored is lost."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from memory_helpers import RULE, capital_stream, discount_stream

from dostream.cli.memory import cli_main
from dostream.memory.store import Cite, Memory
from dostream.stream import write_streams

STREAMS = [discount_stream(i, w, user=f"u{i}") for i, w in enumerate(["teacher", "nurse", "pilot"])] + [
    capital_stream(0)
]


def _memory(tmp_path):
    mem = Memory.open_dir(tmp_path / "mem")
    rule = mem.add(RULE, "extractive", evidence=[Cite(STREAMS[0], 5)], situation=[Cite(STREAMS[0], 3)])
    paris = mem.add("Wrong, it is Paris.", "extractive", evidence=[Cite(STREAMS[3], 2)])
    mem.close()
    return tmp_path / "mem", rule, paris


def test_list_show_query_forget(tmp_path):
    mem, rule, paris = _memory(tmp_path)
    listed = run_cli("memory", "list", mem).stdout.splitlines()
    assert len(listed) == 2 and "supported 1" in listed[0] and "active" in listed[0]
    shown = run_cli("memory", "show", mem, rule).stdout
    assert "evidence  d0 segment 5" in shown and "situation d0 segment 3" in shown and "agent" in shown
    [hit] = [
        json.loads(line)
        for line in run_cli("memory", "query", mem, "discount for a nurse?", "-k", "1", "--json").stdout.splitlines()
    ]
    assert hit["id"] == rule and hit["evidence"][0]["author"] == "user"
    forgot = run_cli("memory", "forget", mem, "--user", "u0")
    assert f"1 note(s) forgotten: [{rule}]" in forgot.stderr
    assert [json.loads(x)["id"] for x in run_cli("memory", "list", mem, "--json").stdout.splitlines()] == [paris]
    assert "forgotten" in run_cli("memory", "list", mem, "--all").stdout


def test_bad_input_is_one_line_and_loses_nothing(tmp_path):
    mem, rule, _ = _memory(tmp_path)
    before = (mem / "memory.sqlite").read_bytes()
    bad = tmp_path / "bad.jsonl"
    write_streams(bad, STREAMS[:1])
    bad.write_text(bad.read_text() + '{"id": "x", "segments": [{"author": "bot", "text": "hi"}]}\n')
    for args, message in [
        (
            ["distill", bad, "--memory", mem, "--model", "tiny"],
            f"{bad}:2: field 'segments[0].author': unknown author 'bot'",
        ),
        (["distill", tmp_path / "missing.jsonl", "--memory", mem], "missing.jsonl: No such file or directory"),
        (["distill", bad, "--memory", mem, "--writer", "endpoint"], "--writer endpoint needs --writer-url"),
        (["distill", bad, "--memory", mem, "--tolerance", "-1"], "argument --tolerance: must be >= 0, got -1.0"),
        (["show", mem, "99"], "no note 99"),
        (["list", tmp_path / "nowhere"], "no memory there"),
        (["forget", mem], "one of the arguments --stream/--source --user --key is required"),
    ]:
        proc = run_cli("memory", *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert (mem / "memory.sqlite").read_bytes() == before
    assert not (tmp_path / "nowhere").exists()


def test_distill_in_process_stores_only_admitted_notes(tmp_path, capsys):
    """The tiny random model's verdicts are noise; what holds is that every stored note carries its
    admission record and world-authored evidence only, and the summary counts them."""
    streams = tmp_path / "s.jsonl"
    write_streams(streams, STREAMS)
    args = ["distill", str(streams), "--memory", str(tmp_path / "mem"), "--model", "tiny", "--no-progress"]
    assert cli_main([*args, "--max-others", "1"]) == 0
    err = capsys.readouterr().err
    mem = Memory.open_dir(tmp_path / "mem", read_only=True)
    notes = mem.notes()
    assert f"4 streams, 2 candidates tested, {len(notes)} new notes stored" in err and "0 known notes cited" in err
    for n in notes:
        assert n.admission["admitted"] and "delta" in n.admission["covered"]
        assert {x.author for x in n.evidence} <= {"user"}


def test_consolidate_is_one_gated_update_recorded_in_the_memory_then_nothing_new(tmp_path, capsys):
    """`update_once` on the notes' cited world segments, the gate asking the note with a situation
    before its evidence, the update in the memory file's versions table."""
    mem, rule, paris = _memory(tmp_path)
    args = ["consolidate", str(mem), "--model", "tiny", "--epochs", "1", "--lora-r", "2", "--gate-tolerance", "1"]
    assert cli_main(args) == 0
    assert "version 1 accepted: gate success" in capsys.readouterr().err
    assert (mem / "adapters" / "update-000001" / "adapter").is_dir()
    from dostream.learning.versions import Versions

    m = Memory.open_dir(mem, read_only=True)
    [row] = Versions(m.db).rows()
    assert (
        row["seen"] == {"notes": paris} and row["gate"]["n"] == 1 and row["gate"]["checks"][0]["id"] == f"note-{rule}"
    )
    assert row["current"] == "adapters/update-000001/adapter" and row["metrics"]["streams/new"] == 2
    m.close()
    assert cli_main(args) == 0
    assert "no note is new since the last consolidation" in capsys.readouterr().err


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_sigkill_mid_consolidation_resumes_exactly(tmp_path):
    """A consolidation killed mid-update continues its directory on the next run (the same notes:
    the cycle checks the batch it was made for) and ends with the uninterrupted run's adapter."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    mem, _, _ = _memory(tmp_path)
    shutil.copytree(mem, tmp_path / "b")
    cmd = [sys.executable, "-m", "dostream.cli", "memory", "consolidate"]
    flags = ["--model", "tiny", "--epochs", "40", "--lora-r", "2", "--gate-tolerance", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, str(mem), *flags], check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.Popen([*cmd, str(tmp_path / "b"), *flags], stderr=subprocess.DEVNULL, env=env)
    checkpoint = tmp_path / "b" / "adapters" / "update-000001"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoint / "config.json").exists():  # training has begun
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (checkpoint / "adapter").exists(), "the kill did not land inside the update"
    subprocess.run([*cmd, str(tmp_path / "b"), *flags], check=True, capture_output=True, env=env, timeout=600)
    a, b = (p / "adapters" / "update-000001" / "adapter" / "adapter_model.safetensors" for p in (mem, tmp_path / "b"))
    assert a.read_bytes() == b.read_bytes()
