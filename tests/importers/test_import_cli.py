"""`dostream import` and the stream-reading commands as a user meets them: every failure of the
issue's list is one line naming file:line:field (or the flag), a non-zero exit, no traceback, and
no partial output file."""

import json
import subprocess

import pytest
from conftest import ROOT, run_cli

from dostream.cli.main import main

FIX = ROOT / "tests/fixtures/import"


@pytest.fixture
def cli(capsys, monkeypatch):
    """`dostream ARGS...` in this process (the commands that load a tokenizer cost a subprocess
    seconds each; `import` runs as a subprocess below, the way a user runs it)."""
    monkeypatch.setenv("NO_COLOR", "1")

    def run(*args, check=True):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        proc = subprocess.CompletedProcess(args, rc, out, err)
        if check and rc != 0:
            raise AssertionError(f"dostream {args} exited {rc}:\n{err}")
        return proc

    return run


def fails(*args, cli=None):
    proc = (cli or run_cli)(*args, check=False)
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_import_every_format(tmp_path):
    out = tmp_path / "streams.jsonl"
    files = sorted(p for p in FIX.iterdir() if p.suffix in (".json", ".jsonl"))
    proc = run_cli("import", *files, "--out", out, "--assistant", "other")
    streams = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(streams) == 23 and len({s["id"] for s in streams}) == 23
    summary = proc.stderr.strip()
    assert summary.startswith("dostream import: read 23 record(s) from 8 file(s)") and f"wrote {out}" in summary
    assert "11 tool call(s)" in summary and "teacher" in summary


def test_provenance_is_asked_for_in_two_sentences(tmp_path):
    out = tmp_path / "out.jsonl"
    line = fails("import", FIX / "openai_tools.json", "--out", out)
    assert line.startswith(f"dostream import: --assistant is needed: {FIX / 'openai_tools.json'}:2 (messages[2])")
    assert line.count(". ") == 1 and "--assistant self" in line and "--assistant other" in line
    assert not out.exists()


def test_no_partial_output(tmp_path):
    """A bad record stops the import: OUT is not written, and an existing OUT is left as it was."""
    src = tmp_path / "logs.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}
    src.write_text("\n".join(json.dumps(r) for r in (good, good, bad, good)) + "\n")
    out = tmp_path / "out.jsonl"
    line = fails("import", src, "--out", out, "--assistant", "other")
    assert line == (
        f"dostream import: {src}:3: field 'messages[1].content': an assistant turn with neither content nor a tool call"
    )
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["logs.jsonl"]
    out.write_text("old\n")
    fails("import", src, "--out", out, "--assistant", "other")
    assert out.read_text() == "old\n"
    ok = run_cli("import", src, "--out", out, "--assistant", "other", "--skip-invalid")
    assert len(out.read_text().splitlines()) == 3
    assert (
        "read 4 record(s)" in ok.stderr and "kept 3; skipped 1 (1 × messages[1].content: an assistant turn" in ok.stderr
    )


def test_skip_invalid_with_nothing_kept_fails(tmp_path):
    src = tmp_path / "all_bad.jsonl"
    src.write_text('{"messages": [{"role": "narrator", "content": "x"}]}\n{oops\n')
    out = tmp_path / "out.jsonl"
    line = fails("import", src, "--out", out, "--assistant", "other", "--skip-invalid")
    assert line.startswith("dostream import: nothing kept: read 2 record(s) from 1 file(s); kept 0; skipped 2 (")
    assert "unknown role 'narrator'" in line and "not valid JSON" in line
    assert not out.exists()


def test_duplicate_ids_and_dedupe(tmp_path):
    src = tmp_path / "dup.jsonl"
    row = json.dumps({"id": 7, "messages": [{"role": "user", "content": "hi"}]})
    src.write_text(f"{row}\n{row}\n")
    out = tmp_path / "out.jsonl"
    line = fails("import", src, "--out", out)
    assert line.startswith(f"dostream import: {src}:2: field 'id': duplicate id '7' (first at {src}:1)")
    assert "--dedupe" in line and not out.exists()
    run_cli("import", src, "--out", out, "--dedupe")
    assert len(out.read_text().splitlines()) == 1


def test_role_map_errors_name_the_flag(tmp_path, cli):
    out = tmp_path / "out.jsonl"
    assert fails("import", FIX / "sharegpt.jsonl", "--out", out, "--role-map", "gpt=bot").startswith(
        "dostream import: --role-map: gpt=bot: 'bot' is neither a role"
    )
    # import renames roles; render's --role-map assigns authors and says so
    run_cli("import", FIX / "sharegpt.jsonl", "--out", out, "--role-map", "gpt=assistant,assistant=teacher")
    assert not out.exists() or "teacher" in out.read_text()
    line = fails("render", ROOT / "examples/tool_chat.jsonl", "--role-map", "gpt=assistant", cli=cli)
    assert line == (
        "dostream render: --role-map: 'gpt=assistant': 'assistant' is not an author (one of agent, user, teacher, "
        "tool, verifier, oracle, environment, protocol, context) (renaming a role is for dostream import --role-map)"
    )


@pytest.mark.parametrize("cmd", ["render", "show", "train"])
def test_json_array_where_jsonl_is_expected(tmp_path, cmd, cli):
    extra = ["--model", "tiny", "--out", tmp_path / "run"] if cmd == "train" else []
    line = fails(cmd, FIX / "openai_tools.json", *extra, cli=cli)
    assert line.startswith(f"dostream {cmd}: {FIX / 'openai_tools.json'}:1: this is a JSON array")
    assert "run `dostream import FILE --out streams.jsonl` first" in line
    if cmd == "render":
        assert "pretty-printed JSON document" in fails(cmd, FIX / "single.json", "--skip-invalid", cli=cli)
        sharegpt = fails(cmd, FIX / "sharegpt.jsonl", cli=cli)
        assert "field 'segments': missing field: this is a ShareGPT row ('conversations')" in sharegpt
        assert "dostream import" in sharegpt
    assert not (tmp_path / "run").exists()


def test_render_skip_invalid_summary_and_nothing_kept(tmp_path, cli):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(FIX.joinpath("sharegpt.jsonl").read_text().splitlines()) + "\n")
    proc = cli("render", src, "--skip-invalid", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dostream: skipped 2 invalid line(s), kept 0" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"dostream render: no stream was read from {src}")


def test_per_author_split_and_warnings(tmp_path, cli):
    """render/show/train print who is supervised, and warn when assistant turns nobody sampled are
    all masked, when demonstrations are masked, when rows were truncated, when chat logs are
    rendered plain."""
    mine = tmp_path / "self.jsonl"
    run_cli("import", FIX / "openai_tools.json", "--out", mine, "--assistant", "self")
    err = cli("render", mine, "--max-length", "64").stderr
    assert "supervised tokens by author under view 'interventional': " in err and "agent 0/" in err
    assert "warning: all " in err and "agent tokens are masked" in err and "--assistant other" in err
    assert "warning: 3 of 3 row(s) truncated to 64 tokens" in err
    assert "chat logs rendered plain" in err
    err = cli("show", mine, "--chat-template", "--view", "agent,context").stderr  # a view without teacher
    assert "supervised tokens by author under view 'agent,context'" in err and "chat logs rendered plain" not in err
    other = tmp_path / "other.jsonl"
    run_cli("import", FIX / "openai_tools.json", "--out", other, "--assistant", "other")
    err = cli("render", other, "--view", "user,tool").stderr
    assert "warning: all " in err and "teacher tokens are masked under view 'user,tool'" in err
    assert "warning: all" not in cli("render", other, "--chat-template").stderr
    twice = tmp_path / "twice.jsonl"
    twice.write_text(other.read_text().splitlines()[0] + "\n" + other.read_text())
    assert "warning: 1 stream(s) repeat an earlier stream's id" in cli("render", twice, "--chat-template").stderr


def test_truncation_keeps_the_system_prompt_and_tool_list(tmp_path, cli):
    streams = tmp_path / "s.jsonl"
    run_cli("import", FIX / "openai_tools.json", "--out", streams, "--assistant", "other")
    full = json.loads(cli("render", streams, "--chat-template").stdout.splitlines()[0])
    cut = json.loads(cli("render", streams, "--chat-template", "--max-length", "300").stdout.splitlines()[0])
    assert len(cut["input_ids"]) <= 300 < len(full["input_ids"])
    head = full["text"].index("<|im_start|>user")
    assert cut["text"].startswith(full["text"][:head])  # system prompt and tool list kept
    assert cut["text"].endswith(full["text"][-200:])  # the newest turns kept
    left = json.loads(
        cli("render", streams, "--chat-template", "--max-length", "300", "--truncation-side", "left").stdout.split(
            "\n"
        )[0]
    )
    assert "# Tools" not in left["text"]


def test_import_then_render_keeps_reasoning_with_its_author(tmp_path, cli):
    """#32 through the commands: the reasoning of LLaMA-Factory typed parts, `reasoning_content` and
    inline <think> blocks is rendered in the turn, its tokens the turn's author."""
    out = tmp_path / "r.jsonl"
    run_cli("import", FIX / "reasoning.jsonl", "--out", out, "--assistant", "other")
    streams = [json.loads(line) for line in out.read_text().splitlines()]
    spans = [g["text"] for s in streams for g in s["segments"] if g.get("meta", {}).get("reasoning")]
    assert len(spans) == 8 and all(t.startswith("<think>\n") and t.endswith("\n</think>\n\n") for t in spans)
    records = [json.loads(line) for line in cli("render", out, "--chat-template").stdout.splitlines()]
    for s, r in zip(streams, records):
        for g in s["segments"]:
            if g.get("meta", {}).get("reasoning"):
                at = r["text"].index(g["text"])
                toks = [k for k, o in enumerate(r["offsets"]) if o and at <= o[0] < at + len(g["text"])]
                assert {r["authors"][k] for k in toks} == {"teacher"}
                assert all(r["labels"][k] == r["input_ids"][k] for k in toks)


def test_train_with_no_trainable_row_names_the_file(tmp_path):
    src = tmp_path / "context_only.jsonl"
    src.write_text(json.dumps({"id": "a", "segments": [{"author": "context", "text": "Only a given prompt."}]}) + "\n")
    line = fails("train", src, "--model", "tiny", "--out", tmp_path / "run")
    assert line.startswith(f"dostream train: no training rows in {src}: ")
    assert "no supervised token under view 'interventional'" in line
    assert not (tmp_path / "run").exists()
