"""Tool calls in the OpenAI shape, forced calls (`tool_choice`), on scripted models."""

from __future__ import annotations

import json

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


TWO_TOOLS = [*TOOLS, {"type": "function", "function": {"name": "mul", "description": "Multiply", "parameters": {}}}]


@pytest.mark.parametrize("choice", ["required", "mul"])
def test_tool_choice_required_or_named_forces_a_call_the_model_would_not_make(served, choice):
    """The decisive random model never writes the tool-call convention by itself; under
    `required` it must call one of the tools, under a named function that function. The forced
    opening is recorded as sampled ids of the agent's turn, counted in its meta."""
    c = client(served.url)
    ask = dict(
        model="tiny", messages=[{"role": "user", "content": "Compute something"}], tools=TWO_TOOLS, max_tokens=30
    )
    free = c.chat.completions.create(seed=9, **ask)
    assert free.choices[0].message.tool_calls is None  # left alone, it does not call
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    res = c.chat.completions.create(seed=9, tool_choice=tool_choice, n=2, **ask)
    for ch in res.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        [call] = ch.message.tool_calls
        assert call.function.name in ({"add", "mul"} if choice == "required" else {"mul"})
        assert isinstance(call.function.arguments, str)
    seg = _tool_segment(served.store, res.id)
    assert seg["text"].startswith('<tool_call>\n{"name": "') and seg["meta"]["constrained"] > 5
    assert seg["meta"]["tool_calls"][0]["function"]["name"] == res.choices[0].message.tool_calls[0].function.name
    # streamed: the call comes as a tool_calls delta, its text never as content
    chunks = list(c.chat.completions.create(seed=9, tool_choice=tool_choice, stream=True, **ask))
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    names = [d.function.name for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert len(names) == 1 and names[0] in {"add", "mul"}


def test_a_forced_call_with_arguments_that_are_not_json_is_still_a_call():
    from dostream.serve.record import _forced_call

    text = '<tool_call>\n{"name": "mul", "arguments": {"a": 2,, </tool_call>'
    call = _forced_call(text, "call_x0")
    assert call["function"] == {"name": "mul", "arguments": '{"a": 2,,'} and call["id"] == "call_x0"
    ok = _forced_call('<tool_call>\n{"name": "add", "arguments": {"a": 1} junk', "c")
    assert json.loads(ok["function"]["arguments"]) == {"a": 1}
