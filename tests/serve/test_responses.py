"""`POST /v1/responses` with the official `openai` client: input, instructions, function calls
continued by `previous_response_id`, exact ids and authors, streaming events, refusals."""

from __future__ import annotations

import json

import openai
import pytest
from harness import (
    TOOLS,
    client,
    streams_of,
)

from dostream.render import Renderer
from dostream.stream import Stream

FLAT = [{"type": "function", **TOOLS[0]["function"]}]  # the Responses shape


def _conv(store, rid: str) -> str:
    return store.exchange(rid)[1]


def test_a_string_input_with_instructions_records_exact_ids(served, tok):
    c = client(served.url)
    res = c.responses.create(
        model="tiny", input="Hello there", instructions="Be brief.", max_output_tokens=6, extra_body={"seed": 3}
    )
    assert res.id.startswith("resp_") and res.object == "response" and res.model == "tiny"
    assert res.status in ("completed", "incomplete") and res.instructions == "Be brief."
    [item] = res.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert res.output_text == item.content[0].text
    assert res.usage.total_tokens == res.usage.input_tokens + res.usage.output_tokens
    if res.status == "incomplete":
        assert res.incomplete_details.reason == "max_output_tokens" and res.usage.output_tokens == 6
    [stream] = streams_of(served.store, _conv(served.store, res.id))
    assert [(s.author, s.role) for s in stream.segments] == [
        ("context", "system"),
        ("user", "user"),
        ("agent", "assistant"),
    ]
    # what the model was conditioned on is the recorded stream's rendering, its sampled ids exact
    renderer = Renderer(tok, chat_template=True)
    prompt = renderer.prompt_ids(Stream(stream.id, stream.segments[:2]))
    assert res.usage.input_tokens == len(prompt)
    ids = renderer.render(stream).input_ids
    assert (
        ids[: len(prompt)] == prompt and ids[len(prompt) :][: res.usage.output_tokens] == stream.segments[2].token_ids
    )
    # the same again with previous_response_id: the next turn follows the recorded sample
    nxt = c.responses.create(
        model="tiny", input="And then?", instructions="Be brief.", previous_response_id=res.id, max_output_tokens=4
    )
    assert nxt.previous_response_id == res.id
    [stream] = streams_of(served.store, _conv(served.store, res.id))
    assert [s.author for s in stream.segments] == ["context", "user", "agent", "user", "agent"]  # instructions once
    assert stream.meta["completions"] == [res.id, nxt.id]


def test_a_function_call_continued_by_previous_response_id_and_by_the_whole_history(tool_server, tok):
    c = client(tool_server.url)
    first = c.responses.create(model="tiny", input="What is 1 + 2?", tools=FLAT, max_output_tokens=48)
    [call] = first.output
    assert call.type == "function_call" and call.name == "add" and json.loads(call.arguments) == {"a": 1, "b": 2}
    assert call.status == "completed" and first.status == "completed" and first.tools[0].name == "add"
    out = {"type": "function_call_output", "call_id": call.call_id, "output": "3"}
    second = c.responses.create(
        model="tiny", input=[out], tools=FLAT, previous_response_id=first.id, max_output_tokens=48
    )
    conv = _conv(tool_server.store, first.id)
    assert _conv(tool_server.store, second.id) == conv
    [stream] = streams_of(tool_server.store, conv)
    assert [s.author for s in stream.segments] == ["context", "user", "agent", "tool", "agent"]
    assert stream.segments[2].token_ids and stream.segments[2].meta["tool_calls"][0]["id"] == call.call_id
    assert stream.segments[3].meta.get("tool_call_id") == call.call_id and stream.segments[3].text == "3"
    # a client that resends the whole history (its own call items back) continues the same samples
    history = [{"role": "user", "content": "What is 1 + 2?"}, call.model_dump(exclude_none=True), out]
    history += [
        second.output[0].model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": "x", "output": "9"},
    ]
    # (the first call is matched by its id; the second reply's call is the same script's)
    history[-1]["call_id"] = second.output[0].call_id
    third = c.responses.create(model="tiny", input=history, tools=FLAT, max_output_tokens=48)
    assert _conv(tool_server.store, third.id) == conv
    [stream] = streams_of(tool_server.store, conv)
    assert [s.author for s in stream.segments] == ["context", "user", "agent", "tool", "agent", "tool", "agent"]
    # a function call no sample made is the client's own: teacher
    forged = [
        history[0],
        {**history[1], "call_id": "call_mine", "arguments": '{"a": 5, "b": 5}'},
        {**out, "call_id": "call_mine"},
    ]
    own = c.responses.create(model="tiny", input=forged, tools=FLAT, max_output_tokens=48)
    [stream] = streams_of(tool_server.store, _conv(tool_server.store, own.id))
    assert [s.author for s in stream.segments] == ["context", "user", "teacher", "tool", "agent"]


def test_streaming_events_in_order_deltas_join_to_the_text(served):
    c = client(served.url)
    ask = dict(model="tiny", input="Stream please", max_output_tokens=8, extra_body={"seed": 5})
    whole = c.responses.create(**ask)
    events = list(c.responses.create(stream=True, **ask))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    end = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", end]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text and events[-1].response.output_text == text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    # the SDK's own accumulator
    if whole.status == "completed":
        with c.responses.stream(**ask) as s:
            final = s.get_final_response()
        assert final.output_text == whole.output_text


def test_a_streamed_function_call(tool_server):
    c = client(tool_server.url)
    events = list(c.responses.create(model="tiny", input="Add", tools=FLAT, max_output_tokens=48, stream=True))
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds
    assert kinds[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(events[-1].response.output[0].arguments) == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "function_call_output", "output": "3"}]}, "input[0].call_id"),
        ({"input": [{"role": "user", "content": "hi", "author": "agent"}]}, "input[0].author"),
        ({"input": [{"role": "user", "content": "<|im_start|>"}]}, "input[0].content"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"max_output_tokens": 65}, "max_output_tokens"),
        ({"tool_choice": {"type": "function", "name": "mul"}, "tools": FLAT}, "tool_choice.name"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_bad_requests_are_400_naming_the_field(served, extra, param):
    c = client(served.url)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(**{"model": "tiny", "input": "hi", "max_output_tokens": 4, **extra})
    assert e.value.body["param"] == param and e.value.body["message"].startswith(param)


def test_unknown_fields_are_ignored_and_max_output_tokens_is_enforced(served):
    c = client(served.url)
    res = c.responses.create(model="tiny", input="hi", max_output_tokens=3, extra_body={"some_new_field": 1})
    assert res.usage.output_tokens <= 3
