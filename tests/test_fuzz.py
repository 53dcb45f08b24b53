"""Random bytes and random JSON into the readers, the renderer and the verifier: only the project's
own error types may escape (a bad input is the user's to fix, with a message naming it)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dostream.envs.stem import verify
from dostream.render import Renderer, RenderError
from dostream.stream import AUTHORS, StreamError, read_streams

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
segment = st.fixed_dictionaries(
    {"author": st.sampled_from([*AUTHORS, "robot"]), "text": st.text(max_size=30)},
    optional={"token_ids": st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4), "role": json_values},
)
stream_like = st.fixed_dictionaries(
    {"id": st.text(max_size=6) | st.integers()}, optional={"segments": st.lists(segment, max_size=4) | json_values}
)


def _read_all(path) -> list:
    try:
        return list(read_streams(path))
    except StreamError:
        return []


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_give_stream_errors_only(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data)
    _read_all(path)


@FUZZ
@given(lines=st.lists(stream_like | json_values, min_size=1, max_size=4))
def test_random_json_gives_stream_or_render_errors_only(tmp_path_factory, tok, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    renderer = Renderer(tok)
    for stream in _read_all(path):
        try:
            renderer.render(stream)
        except RenderError:
            pass


@FUZZ
@given(
    completion=st.text(max_size=120), answer=st.floats(allow_nan=False, allow_infinity=False), unit=st.text(max_size=6)
)
def test_the_verifier_never_raises(completion, answer, unit):
    v = verify({"answer": answer, "unit": unit, "rel_tol": 0.01, "abs_tol": 0.0}, completion)
    assert isinstance(v.correct, bool)
