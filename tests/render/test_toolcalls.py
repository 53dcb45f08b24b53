"""The tool-call text convention (`dostream/toolcalls.py`): format, parse, preamble, detection."""

import copy
import json

import pytest
from conftest import ROOT

from dostream.toolcalls import (
    call_parts,
    format_calls,
    normalize_call,
    normalize_tool,
    parse_calls,
    template_supports_tools,
    tools_preamble,
)

HERMES = (ROOT / "tests/fixtures/import/hermes_template.jinja").read_text()


def _call(name, args, cid="c1"):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def test_format_is_the_hermes_block():
    text = format_calls([_call("get_weather", '{"city": "Paris", "unit": "°C"}')])
    assert text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
    two = format_calls([_call("a", "{}"), {"name": "b", "arguments": {"x": 1}}])  # legacy function_call shape
    assert two.count("<tool_call>") == 2 and two.split("\n</tool_call>\n")[1].startswith("<tool_call>")


def test_round_trip_keeps_names_and_arguments():
    calls = [_call("add", '{"a": 1, "b": [2, 3]}', "x"), _call("noop", None, "y"), _call("raw", "not json", "z")]
    content, parsed = parse_calls("Sure.\n" + format_calls(calls))
    assert content == "Sure."
    assert [c["function"]["name"] for c in parsed] == ["add", "noop", "raw"]
    assert json.loads(parsed[0]["function"]["arguments"]) == {"a": 1, "b": [2, 3]}
    assert json.loads(parsed[1]["function"]["arguments"]) == {}
    assert parsed[2]["function"]["arguments"] == "not json"  # kept as written, never dropped
    assert [c["id"] for c in parsed] == ["call_0", "call_1", "call_2"] and all(c["type"] == "function" for c in parsed)


def test_parse_keeps_what_is_not_a_call():
    text = "a <tool_call>{oops}</tool_call> b"
    assert parse_calls(text) == (text, [])
    assert parse_calls("no calls here ") == ("no calls here", [])
    # a block cut at the stop string `</tool_call>` still counts when its JSON is complete
    content, calls = parse_calls('x\n<tool_call>\n{"name": "f", "arguments": {"k": 2}}\n')
    assert content == "x" and calls[0]["function"] == {"name": "f", "arguments": '{"k": 2}'}
    assert parse_calls('<tool_call>\n{"name": "f", "argu')[1] == []


def test_shapes_and_errors():
    assert call_parts({"function": {"name": "f", "arguments": '{"a": 1}'}}) == ("f", {"a": 1})
    assert call_parts({"name": "f", "parameters": {"a": 1}}) == ("f", {"a": 1})
    assert normalize_call({"name": "f"}, 3) == _call("f", "{}", "call_3")
    with pytest.raises(ValueError, match="function name"):
        call_parts({"function": {"arguments": "{}"}})
    assert normalize_tool({"name": "f", "parameters": {}}) == {
        "type": "function",
        "function": {"name": "f", "parameters": {}},
    }
    with pytest.raises(ValueError):
        normalize_tool({"description": "nameless"})


def test_preamble_lists_every_tool():
    tools = [{"name": "f", "description": "d", "parameters": {}}, {"type": "function", "function": {"name": "g"}}]
    text = tools_preamble(tools)
    assert text.startswith("# Tools\n") and "<tools>\n" in text and "</tools>" in text
    listed = text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(x)["function"]["name"] for x in listed] == ["f", "g"]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in text


def test_template_support_is_detected(tok):
    assert not template_supports_tools(tok)  # SmolLM2's template ignores tools: the text form is used
    hermes = copy.deepcopy(tok)
    hermes.chat_template = HERMES
    assert template_supports_tools(hermes)
    # the text form is what a Hermes template writes itself
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    out = hermes.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_call("f", {"a": 1})]}],
        tools=tools,
        tokenize=False,
    )
    assert format_calls([_call("f", {"a": 1})]) in out
    assert tools_preamble(tools) in out
