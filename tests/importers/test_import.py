"""Importers (`dostream/importers/`): formats, provenance, tool calls, JSON shapes, errors.

The fixtures in tests/fixtures/import/ were written for these tests (no public dataset is copied).
"""

import copy
import json
import sys

import pytest
from conftest import ROOT

from dostream.importers import (
    ImportReport,
    ProvenanceError,
    import_streams,
    jsonio,
    messages_to_segments,
    parse_role_map,
)
from dostream.render import Renderer
from dostream.stream import Stream, StreamError

FIX = ROOT / "tests/fixtures/import"


def load(name, **kw):
    kw.setdefault("assistant", "other")
    return {s.id: s for s in import_streams([str(FIX / name)], **kw)}


@pytest.fixture(scope="module")
def hermes(tok):
    """The smollm2 tokenizer with a chat template that writes tools itself (Hermes / Qwen2.5 style)."""
    t = copy.deepcopy(tok)
    t.chat_template = (FIX / "hermes_template.jinja").read_text()
    return t


def shape(stream):
    return [(s.author, s.role) for s in stream.segments]


# -- formats --------------------------------------------------------------------------------------


def test_openai_tool_calls_null_content_and_tools():
    s = load("openai_tools.json")["weather-1"]
    assert shape(s) == [
        ("context", "system"),  # the system prompt
        ("context", "system"),  # the tool list, after it
        ("user", "user"),
        ("teacher", "assistant"),  # content null: only the calls
        ("tool", "tool"),
        ("tool", "tool"),
        ("teacher", "assistant"),
    ]
    tools, calls = s.segments[1], s.segments[3]
    assert [t["function"]["name"] for t in tools.meta["tools"]] == ["get_weather", "get_time"]
    assert tools.text.startswith("\n\n# Tools") and "get_time" in tools.text
    assert [c["function"]["name"] for c in calls.meta["tool_calls"]] == ["get_weather", "get_time"]
    assert calls.text.count("<tool_call>") == 2 and calls.text.startswith("<tool_call>")
    assert s.segments[4].meta == {"tool_call_id": "call_w", "name": "get_weather"}
    assert s.segments[5].meta["new_message"] is True  # two tool answers stay two messages
    assert s.meta["import"] == {"file": "openai_tools.json", "line": 2, "index": 0, "format": "openai"}


def test_openai_content_parts_weight_zero_and_reasoning():
    s = load("openai_tools.json")["parts-1"]
    assert shape(s) == [
        ("context", "system"),  # developer → system
        ("user", "user"),
        ("context", "assistant"),  # weight 0: kept in the context, never supervised
        ("teacher", "assistant"),  # the reasoning part, first
        ("teacher", "assistant"),  # the text part
        ("teacher", "assistant"),  # the tool_call part
        ("tool", "tool"),
        ("teacher", "assistant"),  # reasoning_content
        ("teacher", "assistant"),
    ]
    assert s.segments[1].text == "Convert 3 miles to km.\nRound to one decimal."
    assert s.segments[3].text == "<think>\n1 mile is 1.609 km, so use the converter.\n</think>\n\n"
    assert s.segments[3].meta == {"reasoning": True, "new_message": True}  # after the weight-0 assistant message
    assert s.segments[4].text == "Converting." and s.segments[4].meta == {}
    assert s.segments[5].text.startswith("\n<tool_call>\n")  # after the turn's text
    assert json.loads(s.segments[5].meta["tool_calls"][0]["function"]["arguments"]) == {
        "value": 3,
        "from": "mi",
        "to": "km",
    }
    assert [g.text for g in s.segments[7:]] == ["<think>\n4.828 rounds to 4.8.\n</think>\n\n", "3 miles is 4.8 km."]


def test_openai_legacy_function_call():
    s = load("openai_tools.json")["legacy-1"]
    assert shape(s) == [
        ("context", "system"),
        ("user", "user"),
        ("teacher", "assistant"),
        ("tool", "tool"),
        ("teacher", "assistant"),
    ]
    assert s.segments[0].meta["tools"][0]["function"]["name"] == "lookup_isbn"  # top-level `functions`
    assert '"name": "lookup_isbn"' in s.segments[2].text and s.segments[3].meta == {"name": "lookup_isbn"}


def test_sharegpt_function_call_observation_and_typed_parts():
    streams = load("sharegpt.jsonl")
    s = streams["sg-tools"]
    assert shape(s) == [
        ("context", "system"),
        ("context", "system"),
        ("user", "user"),
        ("teacher", "assistant"),
        ("tool", "tool"),
        ("teacher", "assistant"),
    ]
    assert s.segments[1].meta["tools"][0]["function"]["name"] == "check_stock"  # `tools` was a JSON string
    assert s.segments[3].meta["tool_calls"][0]["function"] == {"name": "check_stock", "arguments": '{"sku": "K-22"}'}
    p = streams["sg-parts"]
    assert [g.text for g in p.segments][1:3] == [
        "What is the boiling point of water at sea level?",
        "100 °C at standard pressure.",
    ]


def test_alpaca_trl_nested_single_and_native():
    alpaca = list(load("alpaca.json").values())
    assert [g.text for g in alpaca[1].segments] == ["Translate to French.\n\nGood morning", "Bonjour"]
    assert shape(alpaca[2]) == [("context", "system")] + [("user", "user"), ("teacher", "assistant")] * 2
    assert alpaca[0].id == "alpaca.json:0"  # no id in the source: file and index

    trl = list(load("trl.jsonl").values())
    assert [s.meta["import"]["format"] for s in trl] == ["openai", "trl", "trl"]
    assert shape(trl[1]) == [("user", "user"), ("teacher", "assistant")]
    assert shape(trl[2]) == [("context", "system"), ("user", "user"), ("teacher", "assistant")]

    nested = load("nested.jsonl")
    assert set(nested) == {"nested.jsonl:0", "hist-7", "deep-3"}  # `instance_id` is not a stream id
    assert nested["nested.jsonl:0"].segments[2].text == "Let me look."  # under `traj`
    assert nested["deep-3"].segments[1].text == "pong"  # data.dialog.messages, found by name
    deep = load("nested.jsonl", messages_key="data.dialog.messages", skip_invalid=True)
    assert list(deep) == ["deep-3"]

    assert list(load("single.json")) == ["single-1"]  # one pretty-printed object
    native = list(load("dostream.jsonl").values())
    assert shape(native[0]) == [("context", None), ("teacher", None)]
    assert [g.author for g in native[1].segments] == ["user", "teacher", "agent"]  # authors as written


# -- provenance ---------------------------------------------------------------------------------


def test_provenance_is_a_decision():
    with pytest.raises(ValueError, match="--assistant is needed: .*openai_tools.json:2 \\(messages\\[2\\]\\)") as err:
        load("openai_tools.json", assistant=None)
    assert str(err.value).count(". ") == 1  # two sentences
    assert {s.segments[2].author for s in load("openai_tools.json", assistant="self").values()} >= {"agent"}
    # authors in the data need no flag
    assert list(load("dostream.jsonl", assistant=None)) == ["dostream.jsonl:0", "authored"]

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "token_ids": [1, 2]}]
    segs = messages_to_segments(msgs)  # sampled ids: the model wrote it (self)
    assert [s.author for s in segs] == ["user", "agent"] and segs[1].token_ids == [1, 2]
    with pytest.raises(ProvenanceError, match="messages\\[0\\]: say who wrote"):
        messages_to_segments([{"role": "assistant", "content": "x"}])
    weighted = [
        {"role": "assistant", "content": "a", "weight": 0},
        {"role": "assistant", "content": "b", "author": "oracle"},
    ]
    assert [s.author for s in messages_to_segments(weighted)] == ["context", "oracle"]  # per message wins


def test_role_map_renames_roles_or_assigns_authors():
    msgs = [{"role": "narrator", "content": "Once."}, {"role": "bot", "content": "Hi."}]
    segs = messages_to_segments(msgs, role_map={"narrator": "system", "bot": "assistant"}, assistant="self")
    assert [(s.author, s.role) for s in segs] == [("context", "system"), ("agent", "assistant")]
    # ROLE=AUTHOR is the same decision as --assistant, and wins over it (a message's own author wins over both)
    msgs.append({"role": "assistant", "content": "x", "author": "teacher"})
    segs = messages_to_segments(msgs, role_map={"narrator": "system", "bot": "assistant", "assistant": "oracle"})
    assert [s.author for s in segs] == ["context", "oracle", "teacher"]
    with pytest.raises(ValueError, match="^--role-map: gpt=bot: 'bot' is neither a role"):
        parse_role_map("gpt=bot")
    with pytest.raises(ValueError, match="^--role-map: expected ROLE=AUTHOR or ROLE=ROLE"):
        parse_role_map("gpt")


def test_unknown_role_names_the_flag_to_use(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "narrator", "content": "hi"}]}) + "\n")
    with pytest.raises(StreamError) as err:
        list(import_streams([str(path)], assistant="other"))
    assert (err.value.line, err.value.field) == (1, "messages[0].role")
    assert "--role-map narrator=ROLE" in str(err.value)


# -- tool calls through the renderer ------------------------------------------------------------


def _names(stream):
    return [c["function"]["name"] for g in stream.segments for c in g.meta.get("tool_calls", [])]


@pytest.mark.parametrize("template", ["smollm2", "hermes"])
def test_calls_are_rendered_with_the_turns_author(tok, hermes, template):
    """Text form (SmolLM2's template has no tools) or the template's own syntax: every call is in
    the text, its tokens carry the assistant turn's author, the tool list is context."""
    t = tok if template == "smollm2" else hermes
    for assistant, author in (("other", "teacher"), ("self", "agent")):
        s = load("openai_tools.json", assistant=assistant)["weather-1"]
        r = Renderer(t, chat_template=True).render(s)
        sup = r.supervised("interventional")
        for name in _names(s):
            start = r.text.index(f'{{"name": "{name}", "arguments"')
            toks = [i for i, o in enumerate(r.offsets) if o and o[0] <= start < o[1]]
            assert r.authors[toks[0]] == author and sup[toks[0]] == (author == "teacher")
        listing = r.text.index('"name": "get_time", "description"')
        assert {r.authors[i] for i, o in enumerate(r.offsets) if o and o[0] <= listing < o[1]} == {"context"}
    if template == "hermes":  # exactly the template's own rendering of the conversation
        raw = json.loads((FIX / "openai_tools.json").read_text())[0]
        msgs = copy.deepcopy(raw["messages"])
        for m in msgs:
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
            m["content"] = m["content"] or ""
        assert r.text == hermes.apply_chat_template(msgs, tools=raw["tools"], tokenize=False)


def test_every_call_of_200_conversations_is_rendered_and_supervised(tok, tmp_path):
    """Done-when: 200 OpenAI-format conversations with 1,000+ tool calls; every call's name in the
    rendered text; under `--assistant other` the assistant turns are supervised."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_import import synthetic_openai

    rows = synthetic_openai(200, seed=1)
    path = tmp_path / "convs.json"
    path.write_text(json.dumps(rows))
    report = ImportReport()
    streams = list(import_streams([str(path)], assistant="other", report=report))
    assert report.kept == 200 and report.tool_calls >= 1000
    renderer = Renderer(tok, chat_template=True)
    n_calls = 0
    for row, s in zip(rows, streams):
        r = renderer.render(s)
        text, pos = r.text, 0
        for m in row["messages"]:
            for c in m.get("tool_calls") or []:
                pos = text.index(f'"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}', pos)
                n_calls += 1
        sup = r.supervised("interventional")
        assistant = [i for i, a in enumerate(r.authors) if a == "teacher"]
        assert assistant and all(sup[i] for i in assistant)
    assert n_calls == report.tool_calls


# -- JSON shapes and errors ----------------------------------------------------------------------


def test_array_is_read_incrementally_with_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonio, "_CHUNK", 7)  # force many refills, values cut mid-token
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": "x" * (i * 5)}, {"role": "assistant", "content": "é"}]}
        for i in range(6)
    ]
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, indent=2) for r in rows) + "\n]\n")
    got = list(jsonio.iter_json(str(path)))
    assert [v for _, v in got] == rows
    lines = path.read_text().splitlines()
    assert all(lines[line - 1].lstrip().startswith("{") for line, _ in got)
    assert [s.id for s in import_streams([str(path)], assistant="self")] == [f"r{i}" for i in range(6)]
    assert jsonio.shape_of('  {"a": 1}\n{"a": 2}') == "lines"
    assert jsonio.shape_of('{\n  "a": 1\n}') == "document"
    assert jsonio.shape_of('{"a": 1, oops}\n') == "lines"  # a bad first JSON Lines record, not a document


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"id": "a", "messages": [{"role": "user", "content": "hi"}]},\n{"id": "b", oops}\n]\n')
    with pytest.raises(StreamError, match=r"bad.json:3: not valid JSON"):
        list(import_streams([str(path)], assistant="self"))
    lines = tmp_path / "bad.jsonl"
    lines.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{oops\n{"id": "c", "messages": [{"role": "user", "content": "yo"}]}\n'
    )
    report = ImportReport()
    kept = [s.id for s in import_streams([str(lines)], assistant="self", skip_invalid=True, report=report)]
    assert kept == ["a", "c"] and report.read == 3 and sum(report.skipped.values()) == 1


def test_record_errors_name_the_field_and_skip_counts_by_reason(tmp_path):
    bad = [
        {"id": "1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        {"id": "2", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"id": "3", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"id": "4", "messages": [{"role": "assistant", "content": "a", "weight": 0.5}]},
        {"id": "5", "messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
        {"id": "6", "tools": "[not json", "messages": [{"role": "user", "content": "q"}]},
        {"id": "7", "nothing": "here"},
    ]
    fields = [
        "messages[1].content",
        "messages[1].content",
        "messages[0].content[0].type",
        "messages[0].weight",
        "messages[0].tool_calls[0]",
        "tools",
        None,
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    for k, (row, field) in enumerate(zip(bad, fields)):
        one = tmp_path / f"one{k}.jsonl"
        one.write_text(json.dumps(row) + "\n")
        with pytest.raises(StreamError) as err:
            list(import_streams([str(one)], assistant="other"))
        assert (err.value.line, err.value.field) == (1, field), (row, str(err.value))
        assert str(err.value).startswith(f"{one}:1: ")
    report = ImportReport()
    assert list(import_streams([str(path)], assistant="other", skip_invalid=True, report=report)) == []
    assert report.read == 7 and report.kept == 0 and sum(report.skipped.values()) == 7
    assert report.skipped["messages[1].content: an assistant turn with neither content nor a tool call"] == 2
    assert "skipped 7" in report.summary()


def test_duplicate_ids(tmp_path):
    path = tmp_path / "dup.jsonl"
    row = {"id": "same", "messages": [{"role": "user", "content": "hi"}]}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(StreamError, match="dup.jsonl:2: field 'id': duplicate id 'same' \\(first at .*dup.jsonl:1\\)"):
        list(import_streams([str(path)], skip_invalid=True))  # not skipped: a decision, --dedupe
    report = ImportReport()
    assert [s.id for s in import_streams([str(path)], dedupe=True, report=report)] == ["same"]
    assert report.skipped == {"duplicate id (--dedupe)": 1}


@pytest.mark.parametrize("template", ["smollm2", "hermes"])
def test_prompt_is_a_prefix_of_the_answered_stream_with_tools(tok, hermes, template):
    """For the server: what the model is conditioned on (a request converted by
    `messages_to_segments`, open for the assistant) is a prefix of the stream once its sampled
    reply (exact ids; a call in the text form stays text) is appended."""
    from dostream.render import decode
    from dostream.stream import Segment, Stream

    t = tok if template == "smollm2" else hermes
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    calls = [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]
    segs = messages_to_segments(msgs, tools=tools, assistant="self")
    renderer = Renderer(t, chat_template=True)
    prompt = renderer.prompt_ids(Stream("p", segs))
    prompt_text = renderer.render(Stream("p", segs), add_generation_prompt=True).text
    for reply in (
        "It is sunny.<|im_end|>",
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call><|im_end|>',
    ):
        ids = t(reply, add_special_tokens=False)["input_ids"]
        sampled = Segment("agent", decode(t, ids), token_ids=ids, role="assistant", meta={"tool_calls": calls})
        full = renderer.render(Stream("p", [*segs, sampled]))
        assert full.input_ids[: len(prompt)] == prompt
        assert full.input_ids[len(prompt) : len(prompt) + len(ids)] == ids
        assert full.text.count("<|im_end|>") == prompt_text.count("<|im_end|>") + 1  # the sampled one, not twice


def test_imported_fixtures_keep_the_render_invariants(tok, hermes):
    """Invariants 1-3 (one author per token, decodes to the text, labels -100 or the token, the same
    ids for every view) for every fixture, plain, with SmolLM2's template and with one that writes
    tools itself; each segment's characters carry its author."""
    from test_render import check_common

    files = sorted(str(p) for p in FIX.iterdir() if p.suffix in (".json", ".jsonl"))
    streams = list(import_streams(files, assistant="other"))
    assert len(streams) == 23
    for renderer in (Renderer(tok), Renderer(tok, chat_template=True), Renderer(hermes, chat_template=True)):
        for s in streams:
            r = renderer.render(s)
            check_common(r, renderer.tok)
            owner = {}
            for g in r.segments:
                owner.update({c: g["author"] for c in range(g["start"], g["end"])})
            assert all({owner.get(c) for c in range(*o)} == {a} for a, o in zip(r.authors, r.offsets) if o)


# -- reasoning and typed parts (#32) -------------------------------------------------------------


@pytest.fixture(scope="module")
def think(tok):
    """The smollm2 tokenizer with a chat template that writes reasoning in markers of its own."""
    t = copy.deepcopy(tok)
    t.chat_template = (FIX / "think_template.jinja").read_text()
    return t


@pytest.fixture(scope="module")
def qwen3_style(tok):
    """The smollm2 tokenizer with a template that, as Qwen3's, keeps reasoning only after the last user turn."""
    t = copy.deepcopy(tok)
    t.chat_template = (FIX / "qwen3_style_template.jinja").read_text()
    return t


def turns(stream):
    """(author, 'reasoning' | 'calls' | 'text', body) of each assistant-role segment."""
    from dostream.toolcalls import reasoning_body

    out = []
    for g in stream.segments:
        if g.role != "assistant":
            continue
        if g.meta.get("reasoning"):
            out.append((g.author, "reasoning", reasoning_body(g.text)))
        elif g.meta.get("tool_calls"):
            out.append((g.author, "calls", [c["function"]["name"] for c in g.meta["tool_calls"]]))
        else:
            out.append((g.author, "text", g.text))
    return out


def test_reasoning_and_typed_parts_of_every_shape_are_segments_of_the_turn():
    s = load("reasoning.jsonl", assistant="other")
    # LLaMA-Factory's typed parts: `value` strings, the call a JSON string, tools at the row level
    assert turns(s["lf-string-value"]) == [
        ("teacher", "reasoning", "The user asks for two facts about one film. The movie tool has both."),
        ("teacher", "calls", ["get_movie_details"]),
        ("teacher", "reasoning", "Year 2010, director Christopher Nolan."),
        ("teacher", "text", "Inception came out in 2010; Christopher Nolan directed it."),
    ]
    lf = s["lf-string-value"]
    assert lf.segments[0].text == "You answer questions about films."  # a text part's `value`
    assert lf.segments[1].meta["tools"][0]["function"]["name"] == "get_movie_details"
    assert (
        lf.segments[3].text
        == "<think>\nThe user asks for two facts about one film. The movie tool has both.\n</think>\n\n"
    )
    assert lf.segments[4].text.startswith("<tool_call>\n")  # no blank line added after reasoning
    assert lf.segments[4].meta["tool_calls"][0]["function"]["arguments"] == '{"title": "Inception"}'
    assert lf.segments[5].text == '{"year": 2010, "director": "Christopher Nolan"}'
    # `value` as objects (a list of two calls), a `thinking` part
    assert turns(s["lf-object-value"]) == [
        ("teacher", "reasoning", "Two tools: the conversion and the date of the rates."),
        ("teacher", "text", "Let me check both."),
        ("teacher", "calls", ["convert_currency", "get_rate_date"]),
        ("teacher", "text", "50 EUR is 54.10 USD at the rates of 2 May 2024."),
    ]
    # `reasoning_content` beside tool_calls and beside content
    assert [t[:2] for t in turns(s["reasoning-content"])] == [
        ("teacher", "reasoning"),
        ("teacher", "calls"),
        ("teacher", "reasoning"),
        ("teacher", "text"),
    ]
    # a leading <think> block of the text (OpenAI, ShareGPT, Alpaca); a <think> elsewhere is text
    assert turns(s["inline-think"]) == [
        ("teacher", "reasoning", "91 = 7 × 13."),
        ("teacher", "text", "No: 91 = 7 × 13."),
        ("teacher", "text", "The tag <think> marks reasoning; this reply has none."),
    ]
    assert turns(s["sharegpt-think"])[0] == ("teacher", "reasoning", "21, 22, 24 and 25 are composite; 23 is prime.")
    assert turns(s["alpaca-think"]) == [
        ("teacher", "reasoning", "An irregular plural."),
        ("teacher", "text", "Mice."),
    ]
    # the author follows --assistant: the reasoning is the agent's when the model wrote the turn
    agent = load("reasoning.jsonl", assistant="self")
    assert {a for sid in agent for a, _, _ in turns(agent[sid])} == {"agent"}


@pytest.mark.parametrize("template", ["plain", "smollm2", "think", "hermes"])
@pytest.mark.parametrize("assistant", ["other", "self"])
def test_every_call_and_reasoning_span_survives_import_render_export(tok, think, hermes, template, assistant, tmp_path):
    """Done-when (#32): import → stream file → render → training rows keeps every reasoning span and
    every call, token for token, with the turn's author (supervised for teacher, masked for agent)."""
    from dostream.render import encode_rows
    from dostream.stream import read_streams, write_streams
    from dostream.toolcalls import reasoning_body

    t = {"plain": tok, "smollm2": tok, "think": think, "hermes": hermes}[template]
    renderer = Renderer(t, chat_template=template != "plain")
    author = {"other": "teacher", "self": "agent"}[assistant]
    streams = list(import_streams([str(FIX / "reasoning.jsonl")], assistant=assistant))
    write_streams(tmp_path / "s.jsonl", streams)
    back = list(read_streams(tmp_path / "s.jsonl"))
    assert [s.to_json() for s in back] == [s.to_json() for s in streams]  # meta.reasoning kept
    rows, _ = encode_rows(back, renderer, "interventional")
    assert len(rows) == len(back)
    n_reasoning = n_calls = 0
    for s, row in zip(back, rows):
        r = renderer.render(s)
        assert row["input_ids"] == r.input_ids and row["labels"] == r.labels("interventional")
        for g in s.segments:
            if g.meta.get("reasoning"):
                body = reasoning_body(g.text)
                shown = g.text if template != "think" else f"<reasoning>{body}</reasoning>\n"
                n_reasoning += 1
            elif g.meta.get("tool_calls"):
                names = [c["function"]["name"] for c in g.meta["tool_calls"]]
                if template == "hermes":  # the template writes the calls: each name in its own syntax
                    for name in names:
                        at = r.text.index(f'{{"name": "{name}", "arguments"')
                        k = next(i for i, o in enumerate(r.offsets) if o and o[0] <= at < o[1])
                        assert r.authors[k] == author
                    n_calls += len(names)
                    continue
                shown, n_calls = g.text, n_calls + len(names)
            else:
                continue
            ids = t(shown, add_special_tokens=False)["input_ids"]
            at = next(k for k in range(len(r.input_ids)) if r.input_ids[k : k + len(ids)] == ids)
            span = range(at, at + len(ids))
            assert r.text[r.offsets[at][0] : r.offsets[at + len(ids) - 1][1]] == shown
            assert {r.authors[k] for k in span} == {author}
            labels = [row["labels"][k] for k in span]
            assert labels == (ids if author == "teacher" else [-100] * len(ids))
    assert n_reasoning == 8 and n_calls == 4


def test_template_reasoning_markers_and_a_template_that_drops_reasoning(tok, think, qwen3_style):
    from dostream.render import RenderError
    from dostream.toolcalls import template_reasoning_markers

    assert template_reasoning_markers(tok) is None  # SmolLM2: the default form applies
    assert template_reasoning_markers(think) == ("<reasoning>", "</reasoning>\n")
    assert template_reasoning_markers(qwen3_style) == ("<think>\n", "\n</think>\n\n")
    s = load("reasoning.jsonl")
    msgs = [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "reasoning_content": "91 = 7 × 13.", "content": "No: 91 = 7 × 13."},
    ]
    r = Renderer(qwen3_style, chat_template=True).render(Stream("q", s["inline-think"].segments[:3]))
    assert r.text == qwen3_style.apply_chat_template(msgs, tokenize=False)  # the template's own rendering
    with pytest.raises(RenderError, match="drops the reasoning of earlier turns"):
        Renderer(qwen3_style, chat_template=True).render(s["inline-think"])  # reasoning before a user turn


def test_a_sampled_turn_keeps_its_ids_whatever_it_holds(tok):
    from dostream.render import decode

    ids = tok("<think>\nsmall\n</think>\n\n4<|im_end|>", add_special_tokens=False)["input_ids"]
    msgs = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": decode(tok, ids), "token_ids": ids},
    ]
    segs = messages_to_segments(msgs, assistant="self")
    assert [(g.author, g.token_ids, g.meta) for g in segs[1:]] == [("agent", ids, {})]


def test_unparseable_tool_call_values_name_the_field_and_are_skipped_by_reason(tmp_path):
    def row(i, value):
        return {
            "id": f"r{i}",
            "messages": [
                {"role": "system", "content": [{"type": "text", "value": "Use tools."}]},
                {"role": "user", "content": [{"type": "text", "value": "Details of Inception?"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "reasoning", "value": "Call it."}, {"type": "tool_call", "value": value}],
                },
            ],
        }

    cases = [
        ('{"name": "get_movie_details", "arguments": {"title": ', "a tool call that is not valid JSON"),
        ('{"arguments": {"title": "Inception"}}', "a tool call needs a function name"),
        ({"arguments": {}}, "a tool call needs a function name"),
        ("[]", "a tool call part with no call"),
    ]
    for i, (value, reason) in enumerate(cases):
        one = tmp_path / f"one{i}.jsonl"
        one.write_text(json.dumps(row(i, value)) + "\n")
        with pytest.raises(StreamError) as err:
            list(import_streams([str(one)], assistant="other"))
        assert (err.value.line, err.value.field) == (1, "messages[2].content[1].value")
        assert str(err.value).startswith(f"{one}:1: field 'messages[2].content[1].value': {reason}")
    path = tmp_path / "mixed.jsonl"
    good = row(9, json.dumps({"name": "get_movie_details", "arguments": {"title": "Inception"}}))
    path.write_text("".join(json.dumps(row(i, v)) + "\n" for i, (v, _) in enumerate(cases)) + json.dumps(good) + "\n")
    report = ImportReport()
    kept = list(import_streams([str(path)], assistant="other", skip_invalid=True, report=report))
    assert [s.id for s in kept] == ["r9"] and sum(report.skipped.values()) == 4 and report.tool_calls == 1
    assert report.skipped["messages[2].content[1].value: a tool call needs a function name"] == 2
