"""The `dostream` command as a user runs it: subprocess tests of the public contracts."""

import json

from conftest import EXAMPLES, run_cli


def test_help_lists_commands():
    out = run_cli("--help").stdout
    for cmd in ("render", "show", "stem", "theory"):
        assert cmd in out
    assert run_cli("nope", check=False).returncode == 2


def test_render_contract(tok):
    out = run_cli("render", EXAMPLES / "stem_streams.jsonl", "--tokenizer", "smollm2", "--view", "observational").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["stem-wrong-attempt", "stem-correct-attempt"]
    for r in rows:
        assert set(r) == {"id", "text", "input_ids", "labels", "offsets", "authors", "segments"}
        n = len(r["input_ids"])
        assert len(r["labels"]) == len(r["offsets"]) == len(r["authors"]) == n
        assert all(lab in (-100, t) for lab, t in zip(r["labels"], r["input_ids"]))
        assert all(o is None or (0 <= o[0] < o[1] <= len(r["text"])) for o in r["offsets"])
        assert all(set(s) == {"author", "start", "end"} for s in r["segments"])
        assert tok.decode(r["input_ids"], skip_special_tokens=False) == r["text"]
    inter = [
        json.loads(line)
        for line in run_cli("render", EXAMPLES / "stem_streams.jsonl", "--view", "interventional").stdout.splitlines()
    ]
    assert [r["input_ids"] for r in inter] == [r["input_ids"] for r in rows]
    assert sum(x != -100 for x in inter[0]["labels"]) < sum(x != -100 for x in rows[0]["labels"])


def test_render_max_length_and_dropping():
    proc = run_cli("render", EXAMPLES / "stem_streams.jsonl", "--view", "oracle", "--max-length", "12")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    # The correct-attempt stream has no oracle tokens: dropped and counted, not printed.
    assert [r["id"] for r in rows] == ["stem-wrong-attempt"]
    assert len(rows[0]["input_ids"]) == 12
    assert '"dropped_no_supervised": 1' in proc.stderr


def test_render_chat_form_with_template():
    out = run_cli("render", EXAMPLES / "tool_chat.jsonl", "--chat-template").stdout
    r = json.loads(out)
    assert r["text"].startswith("<|im_start|>system\n")
    assert {"teacher", "tool", "agent", "protocol", "context", "user"} == set(r["authors"])


def test_render_reads_stdin_and_role_map():
    line = json.dumps(
        {"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    r = json.loads(run_cli("render", "-", "--role-map", "assistant=teacher", input=line + "\n").stdout)
    assert "teacher" in r["authors"]


def test_bad_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "a", "segments": [{"author": "user", "text": "ok"}]}\n{"id": "b", "segments": [{"author": "bot", "text": "x"}]}\n'
    )
    proc = run_cli("render", bad, check=False)
    assert proc.returncode != 0
    assert f"{bad}:2: field 'segments[0].author': unknown author 'bot'" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = run_cli("render", bad, "--skip-invalid")
    assert len(ok.stdout.splitlines()) == 1 and "skipping invalid stream" in ok.stderr
    assert "unknown view" in run_cli("render", bad, "--view", "robots", check=False).stderr


def test_show_terminal_and_html(tmp_path):
    page = tmp_path / "show.html"
    proc = run_cli("show", EXAMPLES / "stem_streams.jsonl", "--view", "oracle", "--html", page)
    out = proc.stdout
    assert "[LOSS] oracle" in out and "[MASK] agent" in out
    assert "supervised fraction" in out
    html = page.read_text()
    assert html.startswith("<!doctype html>") and 'title="id ' in html and "author oracle" in html
    obs = run_cli("show", EXAMPLES / "tutoring.jsonl", "--view", "observational").stdout
    assert "[LOSS] agent" in obs
