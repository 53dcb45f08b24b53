"""Grammar-constrained decoding (structured outputs): a random tiny model with the real SmolLM2
tokenizer writes JSON valid against a schema on every row, under continuous batching with free
rows, which draw exactly what they draw alone."""

import json

import pytest

from dostream.models import tiny_model
from dostream.sampling import SamplingConfig
from dostream.sampling.decoding import Decode
from dostream.sampling.grammar import GrammarError, json_grammar, tool_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 999},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    return tiny_model(0).eval()


def valid(doc) -> bool:
    """`doc` against SCHEMA (jsonschema where installed, else by hand)."""
    try:
        import jsonschema
    except ImportError:
        return (
            isinstance(doc, dict)
            and set(doc) == set(SCHEMA["required"])
            and isinstance(doc["name"], str)
            and len(doc["name"]) <= 6
            and isinstance(doc["age"], int)
            and 0 <= doc["age"] <= 999
            and doc["color"] in ("red", "green", "blue")
            and isinstance(doc["tags"], list)
            and len(doc["tags"]) <= 2
            and all(isinstance(t, str) and len(t) <= 4 for t in doc["tags"])
        )
    return jsonschema.Draft202012Validator(SCHEMA).is_valid(doc)


def _run(model, tok, rows):
    """rows: (prompt, seed, grammar, join_step) → {tag: Sample}; rows join at their step."""
    run, out, step = Decode(model, tok), {}, 0
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=120)
    while len(out) < len(rows):
        now = [(i, r) for i, r in enumerate(rows) if r[3] == step]
        if now:
            run.add(
                [tok.encode(r[0]) for _, r in now],
                [(r[1], 0) for _, r in now],
                [cfg] * len(now),
                [i for i, _ in now],
                grammars=[r[2] for _, r in now],
            )
        for row in run.step():
            out[row.tag] = row.sample(tok)
        step += 1
    return out


def test_grammar_rows_are_valid_json_and_free_rows_unchanged(model, tok):
    grammar = json_grammar(tok, SCHEMA)
    assert json_grammar(tok, SCHEMA) is grammar  # compiled once per tokenizer and schema
    anyobj = json_grammar(tok, None)
    rows = [(f"Write a person {i}:", 10 + i, grammar if i % 2 == 0 else None, i % 3) for i in range(6)]
    rows.append(("An object:", 99, anyobj, 1))
    out = _run(model, tok, rows)
    for i, (_, _, g, _) in enumerate(rows):
        s = out[i]
        if g is None:
            assert s.grammar is None
            continue
        assert s.grammar == g.kind
        if g is anyobj:  # a random model's keys need not end: every id is the grammar's
            assert s.text.startswith("{") and g.matcher().validate_tokens(s.token_ids) == len(s.token_ids)
            continue
        assert s.finish_reason == "eos", (s.text, s.finish_reason)
        assert valid(json.loads(s.text.removesuffix(tok.eos_token))), s.text
    # Free rows draw the same ids with no grammar row beside them.
    alone = _run(model, tok, [r for r in rows if r[2] is None])
    free = [out[i].token_ids for i, r in enumerate(rows) if r[2] is None]
    assert [s.token_ids for _, s in sorted(alone.items())] == free


def test_bad_schema_names_the_problem(tok):
    with pytest.raises(GrammarError, match="Invalid type"):
        json_grammar(tok, {"type": "foo"})
    with pytest.raises(GrammarError, match="dynamicRef"):
        json_grammar(tok, {"$dynamicRef": "#x"})


ADD = (
    "add",
    {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], "additionalProperties": False},
)


def _accepts(grammar, tok, text: str) -> bool:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    m = grammar.matcher()
    return all(m.consume_token(i) for i in ids) and not m.is_error() and m.is_accepting()


def test_tool_grammars_hold_calls_to_their_schemas(tok):
    one = '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>'
    other = '<tool_call>\n{"name": "noop", "arguments": {"k": [1]}}\n</tool_call>'
    required = tool_grammar(tok, [ADD, ("noop", None)], required=True, parallel=False)
    assert required.kind == "tool_calls" and _accepts(required, tok, one) and _accepts(required, tok, other)
    assert not _accepts(required, tok, "Sure. " + one)  # a call, nothing else
    assert not _accepts(required, tok, one.replace("2", "3"))  # arguments outside the schema
    assert not _accepts(required, tok, one + "\n" + other)  # one call without parallel_tool_calls
    assert _accepts(tool_grammar(tok, [ADD, ("noop", None)], required=True, parallel=True), tok, one + "\n" + other)
    auto = tool_grammar(tok, [ADD], required=False, parallel=False)
    assert auto.kind == "text_or_tool_calls" and _accepts(auto, tok, "Just text, no call")
    assert _accepts(auto, tok, "Let me add. " + one) and not _accepts(auto, tok, "x " + one.replace("2", "5"))
    assert not _accepts(auto, tok, one + "\n" + one)
    reply = tool_grammar(tok, [ADD], required=False, parallel=True, reply=None)
    assert reply.kind == "json_object_or_tool_calls" and _accepts(reply, tok, '{"x": 1}') and _accepts(reply, tok, one)
    assert not _accepts(reply, tok, "text")
    with pytest.raises(GrammarError, match="'bad'") as e:
        tool_grammar(tok, [ADD, ("bad", {"type": "foo"})], required=True, parallel=False)
    assert e.value.function == "bad"


def test_a_required_call_decodes_to_a_schema_valid_call_beside_free_rows(model, tok):
    grammar = tool_grammar(tok, [ADD, ("noop", {"type": "object", "maxProperties": 0})], required=True, parallel=False)
    rows = [("Call something", 5, grammar, 0), ("Plain", 6, None, 0), ("Call again", 7, grammar, 2)]
    out = _run(model, tok, rows)
    for i in (0, 2):
        s = out[i]
        assert s.grammar == "tool_calls" and s.finish_reason == "eos", s.text
        body = json.loads(s.text.removesuffix(tok.eos_token).removeprefix("<tool_call>").removesuffix("</tool_call>"))
        assert body in (
            {"name": "add", "arguments": {"a": 1}},
            {"name": "add", "arguments": {"a": 2}},
            {"name": "noop", "arguments": {}},
        )
    assert out[1].token_ids == _run(model, tok, [rows[1]])[0].token_ids
