"""Structured outputs with the official `openai` client: `response_format` json_schema returns JSON
valid against the schema (also streamed), json_object a JSON object, the Responses API's
`text.format` the same; the record says the reply was drawn under the grammar; 400s name the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from harness import KEY, client, conv_of, streams_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
ASK = dict(model="tiny", messages=[{"role": "user", "content": "A person, as JSON"}], max_tokens=64, seed=4)


def _valid(text: str) -> dict:
    doc = json.loads(text)
    assert set(doc) == {"name", "age", "color"} and isinstance(doc["name"], str) and len(doc["name"]) <= 5
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 99 and doc["color"] in ("red", "green", "blue")
    return doc


def test_json_schema_reply_is_valid_streamed_the_same_and_recorded(served):
    c = client(served.url)
    raw = c.chat.completions.with_raw_response.create(**ASK, n=2, response_format=FORMAT)
    whole = raw.parse()
    for choice in whole.choices:
        assert choice.finish_reason == "stop", choice.message.content
        _valid(choice.message.content)
    agents = [s.segments[-1] for s in streams_of(served.store, conv_of(raw))]
    assert {a.meta.get("constrained_by") for a in agents} == {"json_schema"}
    chunks = c.chat.completions.create(**ASK, n=2, response_format=FORMAT, stream=True)
    text = {0: "", 1: ""}
    for chunk in chunks:
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
    assert sorted(text.values()) == sorted(ch.message.content for ch in whole.choices)


def test_json_object_reply_is_an_object(served):
    c = client(served.url)
    # A random model's keys may not end: the reply is an object as far as it goes.
    out = c.chat.completions.create(**ASK, response_format={"type": "json_object"})
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_responses_text_format_json_schema(served):
    c = client(served.url)
    fmt = {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
    r = c.responses.create(model="tiny", input="A person, as JSON", max_output_tokens=64, text={"format": fmt})
    _valid(r.output_text)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize(
    "fmt,param",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$dynamicRef": "#a"}}},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
def test_bad_response_format_is_400_naming_the_field(served, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(served.url).chat.completions.create(**ASK, response_format=fmt)
    assert e.value.body["param"] == param and e.value.body["message"].startswith(param)


def test_responses_bad_schema_names_text_format(served):
    body = {
        "model": "tiny",
        "input": "x",
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "foo"}}},
    }
    r = httpx.post(f"{served.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.schema", r.text
