"""Stream files: round trips, the chat form, and one clear error per kind of bad input."""

import json

import pytest

from dostream.stream import (
    AUTHORS,
    Segment,
    Stream,
    StreamError,
    read_streams,
    stream_from_json,
    view_authors,
    write_streams,
)


def test_roundtrip(tmp_path):
    streams = [
        Stream(
            "a",
            [Segment("context", "Q: 1+1?\n"), Segment("agent", "3", token_ids=[33]), Segment("oracle", "2")],
            meta={"skill": "add"},
        ),
        Stream("b", [Segment("user", "日本語 🙂 e\u0301", role="user", meta={"k": 1})]),
    ]
    path = tmp_path / "s.jsonl"
    assert write_streams(path, streams) == 2
    assert list(read_streams(path)) == streams


def test_chat_form_and_role_map():
    obj = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "token_ids": [1, 2]},
            {"role": "assistant", "content": "demo", "author": "teacher"},
            {"role": "tool", "content": "42"},
        ],
    }
    s = stream_from_json(obj)
    assert s.id == "7"
    assert [g.author for g in s.segments] == ["context", "user", "agent", "teacher", "tool"]
    assert [g.role for g in s.segments] == ["system", "user", "assistant", "assistant", "tool"]
    s2 = stream_from_json(
        {"id": "x", "messages": [{"role": "assistant", "content": "demo"}]}, role_map={"assistant": "teacher"}
    )
    assert s2.segments[0].author == "teacher"


def test_views():
    assert "agent" not in view_authors("interventional") and "context" not in view_authors("interventional")
    assert view_authors("observational") == frozenset(AUTHORS) - {"context"}
    assert view_authors("oracle, agent") == {"oracle", "agent"}
    with pytest.raises(ValueError, match="unknown view"):
        view_authors("oracle,robot")


GOOD = '{"id": "ok", "segments": [{"author": "user", "text": "hi"}]}'
BAD_LINES = [
    ('{"id": "x", "segments": [{"author": "robot", "text": "hi"}]}', "segments[0].author", "unknown author 'robot'"),
    ('{"id": "x", "segments": [{"author": "user"}]}', "segments[0].text", "missing field"),
    ('{"segments": [{"author": "user", "text": "hi"}]}', "id", "missing field"),
    ('{"id": "x", "segments": [{"author": "user", "text": 5}]}', "segments[0].text", "expected str, got int"),
    ('{"id": "x", "segments": "hello"}', "segments", "expected list, got str"),
    ('{"id": "x", "segments": [{"author": "user", "text": "hi"}', None, "not valid JSON"),
    (
        '{"id": "x", "segments": [{"author": "oracle", "text": "hi", "token_ids": [1]}]}',
        "segments[0].token_ids",
        "only agent segments carry sampled ids",
    ),
    (
        '{"id": "x", "segments": [{"author": "agent", "text": "hi", "token_ids": [1, "2"]}]}',
        "segments[0].token_ids[1]",
        "non-negative integer",
    ),
    (
        '{"id": "x", "messages": [{"role": "narrator", "content": "hi"}]}',
        "messages[0].role",
        "no author in the role map",
    ),
    ('{"id": "x", "segments": []}', "segments", "at least one segment"),
    ("[1, 2]", "<line>", "expected a JSON object"),
]


@pytest.mark.parametrize("line,field,message", BAD_LINES)
def test_bad_input_names_file_line_field(tmp_path, line, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(StreamError) as err:
        list(read_streams(path))
    e = err.value
    assert (e.path, e.line, e.field) == (str(path), 3, field)
    assert message in str(e) and f"{path}:3" in str(e)
    if field:
        assert repr(field) in str(e)


def test_skip_invalid_reports_and_keeps_the_rest(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([GOOD, BAD_LINES[0][0], GOOD, "not json"]) + "\n")
    errors = []
    streams = list(read_streams(path, skip_invalid=True, errors=errors))
    assert len(streams) == 2
    assert [e.line for e in errors] == [2, 4]
    assert "skipping invalid stream" in capsys.readouterr().err


def test_reading_is_lazy(tmp_path):
    """Streams come one line at a time: a bad line far down the file is only met when reached."""
    path = tmp_path / "big.jsonl"
    path.write_text(GOOD + "\n" + "{broken\n")
    it = read_streams(path)
    assert next(it).id == "ok"
    with pytest.raises(StreamError):
        next(it)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "s.jsonl"
    write_streams(path, [Stream("old", [Segment("user", "x")])])

    def broken():
        yield Stream("new", [Segment("user", "y")])
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_streams(path, broken())
    assert [s.id for s in read_streams(path)] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl"]


def test_segment_rejects_token_ids_on_world_segment():
    with pytest.raises(ValueError, match="only agent segments"):
        Segment("teacher", "x", token_ids=[1])
    json.dumps(Segment("agent", "x", token_ids=[1]).to_json())


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    import os

    from dostream.config import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_other_shapes_say_run_dostream_import(tmp_path):
    """A JSON array, a pretty-printed document or another format's row where JSON Lines of streams
    is expected: the error says what the file is and what to run, and --skip-invalid cannot skip a
    whole file's shape."""
    cases = {
        "array.json": ('[{"id": "a", "messages": []}]\n', "this is a JSON array"),
        "array2.json": ('[\n  {"id": "a"}\n]\n', "this is a JSON array"),
        "doc.json": ('{\n  "id": "a",\n  "messages": []\n}\n', "this is a pretty-printed JSON document"),
    }
    for name, (text, what) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        for skip in (False, True):
            with pytest.raises(StreamError) as err:
                list(read_streams(path, skip_invalid=skip))
            assert (err.value.line, str(err.value).startswith(f"{path}:1: {what}")) == (1, True), str(err.value)
            assert "run `dostream import FILE --out streams.jsonl` first" in str(err.value)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"conversations": [{"from": "human", "value": "hi"}]}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    errors = []
    assert list(read_streams(rows, skip_invalid=True, errors=errors)) == []
    assert [e.field for e in errors] == ["segments", "id"]
    assert "this is a ShareGPT row ('conversations')" in errors[0].reason
    assert errors[1].reason == "missing field (dostream import gives every stream a stable id)"


def test_skip_invalid_prints_the_first_few_and_counts_all(tmp_path, capsys):
    path = tmp_path / "many.jsonl"
    path.write_text("not json\n" * 30 + GOOD + "\n")
    errors = []
    assert len(list(read_streams(path, skip_invalid=True, errors=errors))) == 1 and len(errors) == 30
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 21 and err[-1] == "skipping more invalid streams: counted, not printed"


@pytest.mark.parametrize(
    "raw,field,words",
    [
        (b'{"id": "a", "segments": [{"author": "user", "text": "\\ud800"}]}\n', "segments[0].text", "lone surrogate"),
        (b"[" * 100_000 + b"\n", None, "nested too deeply"),
        (b'{"id": "a", "segments": [{"author": "user", "text": "hi \xff"}]}\n', None, "not valid UTF-8"),
        (
            b'{"id": "a", "segments": [{"author": "agent", "text": "x", "token_ids": [4294967296]}]}\n',
            "segments[0].token_ids[0]",
            "non-negative integer below",
        ),
    ],
)
def test_hostile_lines_are_stream_errors_naming_file_and_line(tmp_path, raw, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "ok", "segments": [{"author": "user", "text": "fine"}]}\n' + raw)
    with pytest.raises(StreamError) as e:
        list(read_streams(path))
    assert e.value.line == 2 and e.value.field == field and words in str(e.value)
    assert str(e.value).startswith(f"{path}:2: ")


def test_ids_outside_the_vocabulary_are_a_render_error_naming_file_and_line(tmp_path, tok):
    from dostream.render import Renderer, RenderError

    path = tmp_path / "oov.jsonl"
    path.write_text('{"id": "a", "segments": [{"author": "agent", "text": "x", "token_ids": [60000]}]}\n')
    with pytest.raises(RenderError, match=rf"^{path}:1: .*token id 60000 is not in the tokenizer's vocabulary"):
        Renderer(tok).render(next(read_streams(path)))
