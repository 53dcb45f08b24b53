"""Tool calls in the OpenAI shape, forced calls (`tool_choice`), on scripted models."""

from __future__ import annotations

import json

import openai
import pytest
from harness import (
    TOOLS,
    client,
    conv_of,
    streams_of,
)


# -- tools -----------------------------------------------------------------------------------------
def test_tool_calls_come_back_in_the_openai_shape_and_the_tool_result_continues(tool_server):
    c = client(tool_server.url)
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=48)
    res, conv = raw.parse(), conv_of(raw)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 1, "b": 2}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "3"},
    ]
    raw2 = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=48)
    assert conv_of(raw2) == conv
    [stream] = streams_of(tool_server.store, conv)
    assert [s.author for s in stream.segments] == ["context", "user", "agent", "tool", "agent"]
    assert stream.segments[0].meta["tools"][0]["function"]["name"] == "add"  # the tools preamble
    assert stream.segments[2].text.startswith("<tool_call>") and stream.segments[2].token_ids
    assert stream.segments[2].meta["tool_calls"][0]["function"]["name"] == "add"
    assert stream.segments[3].meta.get("tool_call_id") == call.id and stream.segments[3].text == "3"
    # streamed, the call arrives as a tool_calls delta
    chunks = list(
        c.chat.completions.create(model="tiny", messages=messages[:1], tools=TOOLS, max_tokens=48, stream=True)
    )
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["add"]
    # tool_choice none: no tools shown, no call parsed
    plain = c.chat.completions.create(
        model="tiny", messages=messages[:1], tools=TOOLS, tool_choice="none", max_tokens=48
    )
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def _tool_segment(store, completion_id):
    [samples] = store.db.execute("SELECT samples FROM exchanges WHERE id = ?", (completion_id,)).fetchone()
    return json.loads(samples)[0]


def _schema(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


TWO_TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": _schema(a={"enum": [1, 2, 3]}, b={"enum": [4]})}},
    {
        "type": "function",
        "function": {"name": "mul", "description": "Multiply", "parameters": _schema(x={"enum": [7]})},
    },
]
ARGS = {"add": lambda a: a.keys() == {"a", "b"} and a["a"] in (1, 2, 3) and a["b"] == 4, "mul": lambda a: a == {"x": 7}}


@pytest.mark.parametrize("choice", ["required", "mul"])
def test_tool_choice_required_or_named_forces_a_call_the_model_would_not_make(served, choice):
    """The decisive random model never writes the tool-call convention by itself; under
    `required` it must call one of the tools, under a named function that function, with
    arguments valid against the function's schema (grammar-constrained: every id of the turn is
    drawn under the mask, and the recorded segment says so)."""
    c = client(served.url)
    ask = dict(
        model="tiny", messages=[{"role": "user", "content": "Compute something"}], tools=TWO_TOOLS, max_tokens=60
    )
    free = c.chat.completions.create(seed=9, **ask)
    assert free.choices[0].message.tool_calls is None  # left alone, it does not call
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    res = c.chat.completions.create(seed=9, tool_choice=tool_choice, n=2, parallel_tool_calls=False, **ask)
    for ch in res.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        [call] = ch.message.tool_calls
        assert call.function.name in ({"add", "mul"} if choice == "required" else {"mul"})
        assert ARGS[call.function.name](json.loads(call.function.arguments))
    seg = _tool_segment(served.store, res.id)
    assert seg["text"].startswith('<tool_call>\n{"name": "') and seg["meta"]["constrained_by"] == "tool_calls"
    assert seg["meta"]["tool_calls"][0]["function"]["name"] == res.choices[0].message.tool_calls[0].function.name
    # streamed: the call comes as a tool_calls delta, its text never as content
    chunks = list(c.chat.completions.create(seed=9, tool_choice=tool_choice, stream=True, **ask))
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    names = [d.function.name for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert names and set(names) <= {"add", "mul"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_the_budget_cuts_comes_back_as_its_text_with_finish_length(served, stream):
    """What the model wrote reaches the client (as vLLM returns it): never an empty message."""
    c = client(served.url)
    ask = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Compute something"}],
        tools=TWO_TOOLS,
        tool_choice="required",
        max_tokens=12,
        seed=3,
    )
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **ask))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert not any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices)
    else:
        res = c.chat.completions.create(**ask)
        text, finish = res.choices[0].message.content, [res.choices[0].finish_reason]
        assert res.choices[0].message.tool_calls is None and res.usage.completion_tokens == 12
    assert finish == ["length"] and text.startswith('<tool_call>\n{"name": "')


def test_a_strict_tool_s_arguments_follow_its_schema_whatever_the_model_wants(tool_server):
    """The scripted model writes `add(a=1, b=2)`; a strict `add` whose schema allows only a=3,
    b=4 gets those (the grammar masks every other id), under `tool_choice: auto`."""
    c = client(tool_server.url)
    strict = {"name": "add", "strict": True, "parameters": _schema(a={"enum": [3]}, b={"enum": [4]})}
    res = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is 1 + 2?"}],
        tools=[{"type": "function", "function": strict}],
        max_tokens=48,
    )
    [call] = res.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"a": 3, "b": 4} and res.choices[0].finish_reason == "tool_calls"
    # not strict: the model's own arguments
    loose = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is 1 + 2?"}],
        tools=[{"type": "function", "function": {**strict, "strict": False}}],
        max_tokens=48,
    )
    assert json.loads(loose.choices[0].message.tool_calls[0].function.arguments) == {"a": 1, "b": 2}


def test_bad_tool_fields_are_400s_naming_them(served):
    c = client(served.url)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]
    for extra, param in [
        (dict(tools=bad_schema, tool_choice="required"), "tools[0].function.parameters"),
        (dict(tools=TWO_TOOLS, parallel_tool_calls="no"), "parallel_tool_calls"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}]), "tools[0].function.strict"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**ask, **extra)
        assert e.value.body["param"] == param, e.value.body
