"""Rendering invariants (docs/design.md 1-4) as property tests over random streams, plus goldens."""

import pytest
from conftest import EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dostream.render import IGNORE, Renderer, encode_rows
from dostream.stream import AUTHORS, Segment, Stream, read_streams, view_authors

# Text that stresses tokenisation: word pieces, whitespace-only runs, CJK, emoji (incl. ZWJ
# sequences and skin tones), combining marks, digits, punctuation, newlines.
ATOMS = [
    "hel",
    "lo",
    " world",
    "ing",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "日本",
    "語",
    "🙂",
    "👩‍🔬",
    "👍🏽",
    "e\u0301",
    "\u0301",
    "ñ",
    "Final answer:",
    " 0.250",
    " M.",
    "calc(",
    ")",
    "<",
    "|",
    "Ω",
    "²",
    "½",
]
text_st = st.lists(st.sampled_from(ATOMS), min_size=0, max_size=6).map("".join)
VIEWS = ["interventional", "observational", "oracle", "agent,oracle,user"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def streams(draw, tok):
    segs = []
    for _ in range(draw(st.integers(1, 6))):
        author = draw(st.sampled_from(AUTHORS))
        text = draw(text_st)
        token_ids = None
        if author == "agent" and text and draw(st.booleans()):
            # Sampled ids that differ from the canonical tokenisation: split the text at random
            # character positions and tokenise the pieces separately, maybe ending with EOS.
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=3)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if text[a:b]]
            token_ids = [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]
            if draw(st.booleans()):
                token_ids.append(tok.eos_token_id)
            text = tok.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        segs.append(Segment(author, text, token_ids=token_ids))
    return Stream("s", segs)


def char_authors(stream, eos_text=""):
    """The author of every character of the plain rendering (the closing EOS is the last author's)."""
    return [s.author for s in stream.segments for _ in s.text] + [stream.segments[-1].author] * len(eos_text)


def check_common(r, tok):
    # Per-token lists agree, offsets tile the text, and the ids decode back to it.
    assert len(r.input_ids) == len(r.authors) == len(r.offsets)
    spans = [o for o in r.offsets if o is not None]
    assert "".join(r.text[s:e] for s, e in spans) == r.text
    assert tok.decode(r.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == r.text
    # Invariant 3: the same input_ids for every view; labels are -100 or the input token.
    for view in VIEWS:
        labels = r.labels(view)
        assert all(lab in (IGNORE, t) for lab, t in zip(labels, r.input_ids))
        assert labels[0] == IGNORE


@given(data=st.data())
@SETTINGS
def test_plain_invariants(tok, data):
    stream = data.draw(streams(tok))
    r = Renderer(tok).render(stream)
    check_common(r, tok)
    chars = char_authors(stream, r.text[len(stream.text) :])
    for view in VIEWS:
        keep = view_authors(view)
        for i, sup in enumerate(r.supervised(view)):
            if sup and r.offsets[i] is not None:
                s, e = r.offsets[i]
                # Invariant 1: every character of a supervised token is world-written and in the view.
                assert all(chars[c] in keep for c in range(s, e))
        if "agent" not in keep:
            assert not any(s and a == "agent" for s, a in zip(r.supervised(view), r.authors))
    for i, (a, o) in enumerate(zip(r.authors, r.offsets)):
        if o is not None:
            assert {chars[c] for c in range(*o)} == {a}, "a token straddles two authors"
    # Invariant 2 and prefix stability: each agent segment's sampled ids sit verbatim where the
    # rendering of the stream before it ends.
    plain = Renderer(tok, add_eos=False)
    for k, seg in enumerate(stream.segments):
        if seg.token_ids is not None:
            start = len(plain.render(Stream("p", stream.segments[:k])).input_ids) if k else 0
            assert r.input_ids[start : start + len(seg.token_ids)] == seg.token_ids
    # The stream ends with one EOS, owned by its last author.
    assert r.input_ids[-1] == tok.eos_token_id and r.authors[-1] == stream.segments[-1].author


@given(data=st.data())
@SETTINGS
def test_chat_template_invariants(tok, data):
    stream = data.draw(streams(tok))
    r = Renderer(tok, chat_template=True).render(stream)
    check_common(r, tok)
    seg_chars = ["?"] * len(r.text)
    for seg in r.segments:
        seg_chars[seg["start"] : seg["end"]] = [seg["author"]] * (seg["end"] - seg["start"])
    assert "?" not in seg_chars
    for i, (a, o) in enumerate(zip(r.authors, r.offsets)):
        if o is not None:
            assert set(seg_chars[o[0] : o[1]]) == {a}
    rendered = [(g["author"], r.text[g["start"] : g["end"]]) for g in r.segments]
    for seg in stream.segments:
        assert not seg.text or (seg.author, seg.text) in rendered
        if seg.token_ids:
            assert any(r.input_ids[i : i + len(seg.token_ids)] == seg.token_ids for i in range(len(r.input_ids)))


@given(data=st.data(), max_length=st.integers(1, 24), side=st.sampled_from(["left", "right"]))
@SETTINGS
def test_truncation_never_keeps_unsupervised_rows(tok, data, max_length, side):
    batch = [data.draw(streams(tok)) for _ in range(3)]
    for k, s in enumerate(batch):
        s.id = f"s{k}"
    renderer = Renderer(tok)
    for view in VIEWS:
        rows, stats = encode_rows(batch, renderer, view, max_length=max_length, truncation_side=side)
        # Invariant 4: every kept row trains on something; every other stream is counted as dropped.
        assert all(any(lab != IGNORE for lab in row["labels"]) for row in rows)
        assert all(len(row["input_ids"]) <= max_length for row in rows)
        assert stats.rows + stats.dropped_no_supervised == stats.streams == len(batch)
        for row in rows:
            full = renderer.render(next(s for s in batch if s.id == row["id"]))
            expect = full.input_ids[-max_length:] if side == "left" else full.input_ids[:max_length]
            assert row["input_ids"] == expect


def test_truncation_cuts_text_and_offsets(tok):
    stream = next(read_streams(EXAMPLES / "stem_streams.jsonl"))
    full = Renderer(tok).render(stream)
    r = full.truncate(20)
    assert r.input_ids == full.input_ids[-20:]
    assert r.text == full.text[full.offsets[-20][0] :] if full.offsets[-20] else True
    assert tok.decode(r.input_ids, skip_special_tokens=False) == r.text
    with pytest.raises(ValueError):
        full.truncate(5, "middle")


def test_golden_seed_paper_wrong_attempt(tok):
    """The seed paper's §2.2 stream: under its STEM author set only the correction (and its EOS)
    is supervised; observationally the attempt (with the agent's own EOS) is too."""
    stream = next(read_streams(EXAMPLES / "stem_streams.jsonl"))
    assert stream.id == "stem-wrong-attempt"
    r = Renderer(tok).render(stream)
    attempt, oracle = stream.segments[3], stream.segments[6]
    oracle_ids = tok(oracle.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    labels = r.labels({"oracle"})
    assert [t for t in labels if t != IGNORE] == oracle_ids
    assert r.input_ids[-len(oracle_ids) :] == oracle_ids
    assert labels[-len(oracle_ids) :] == oracle_ids

    obs = [t for t in r.labels({"agent", "oracle"}) if t != IGNORE]
    assert obs == attempt.token_ids + oracle_ids
    assert attempt.token_ids[-1] == tok.eos_token_id  # the agent's decision to stop is its own
    # The standard interventional view also supervises the world's verdict and headers.
    inter = r.labels("interventional")
    assert not any(lab != IGNORE for lab, a in zip(inter, r.authors) if a in ("agent", "context"))


def test_chat_template_end_of_turn_belongs_to_the_turns_author(tok):
    stream = next(read_streams(EXAMPLES / "tool_chat.jsonl"))
    r = Renderer(tok, chat_template=True).render(stream)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    owners = [a for t, a in zip(r.input_ids, r.authors) if t == eot]
    # system (context), user, agent call (sampled EOS), tool, agent answer, user, teacher
    assert owners == ["context", "user", "agent", "tool", "agent", "user", "teacher"]
    labels = r.labels("interventional")
    teacher = [t for t, a in zip(labels, r.authors) if a == "teacher"]
    assert teacher and all(t != IGNORE for t in teacher) and teacher[-1] == eot
    assert all(t == IGNORE for t, a in zip(labels, r.authors) if a == "agent")
    # Template headers are protocol; the default preamble is context.
    assert r.authors[0] == "context"
    assert "protocol" in r.authors


def test_generation_prompt_is_a_prefix_of_the_answered_stream(tok):
    """What the model is conditioned on when it samples is exactly what it is trained on."""
    for chat in (False, True):
        renderer = Renderer(tok, chat_template=chat)
        q = Stream("q", [Segment("user", "What is 2+2?", role="user")])
        prompt = renderer.prompt_ids(q)
        answer = tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        text = tok.decode(answer, skip_special_tokens=False)
        full = renderer.render(Stream("q", q.segments + [Segment("agent", text, token_ids=answer)]))
        assert full.input_ids[: len(prompt)] == prompt
        assert full.input_ids[len(prompt) : len(prompt) + len(answer)] == answer


def test_mismatched_token_ids_are_an_error(tok):
    from dostream.render import RenderError

    s = Stream("bad", [Segment("user", "hi"), Segment("agent", "hello", token_ids=[33, 34])])
    with pytest.raises(RenderError, match="stream 'bad', segment 1 \\(agent\\): token_ids decode to"):
        Renderer(tok).render(s)


def test_example_files_render(tok):
    for path in sorted(EXAMPLES.glob("*.jsonl")):
        for stream in read_streams(path):
            for chat in (False, True):
                check_common(Renderer(tok, chat_template=chat).render(stream), tok)


@given(data=st.data(), max_length=st.integers(1, 40), chat=st.booleans())
@SETTINGS
def test_truncation_by_turns_keeps_the_head(tok, data, max_length, chat):
    """`turns` keeps the head context (leading `context` tokens: system prompt, tool list, the
    template's preamble) and the newest tokens after it, cutting at a turn start where the rest
    fits; `auto` is `turns` with a head, else `left`. Tokens keep their ids, authors and text."""
    stream = data.draw(streams(tok))
    if data.draw(st.booleans()):
        stream.segments.insert(0, Segment("context", data.draw(text_st) or "Be brief.", role="system"))
    full = Renderer(tok, chat_template=chat).render(stream)
    n, head = len(full), full.head
    assert head == next((i for i, a in enumerate(full.authors) if a != "context"), n)
    r = full.truncate(max_length, "turns")
    auto = full.truncate(max_length, "auto")
    assert (
        (auto.input_ids, auto.text) == (r.input_ids, r.text) if head else auto.input_ids == full.input_ids[-max_length:]
    )
    if n <= max_length:
        assert r is full
        return
    assert len(r) <= max_length
    if not 0 < head < max_length:
        assert r.input_ids == full.input_ids[-max_length:]
        return
    start = n - (len(r) - head)
    assert r.input_ids == full.input_ids[:head] + full.input_ids[start:]
    assert r.authors == full.authors[:head] + full.authors[start:]
    assert start in full.turn_starts or start == n - (max_length - head)  # whole turns, else the newest one cut
    assert start == next((t for t in full.turn_starts if t >= head and n - t <= max_length - head), start)
    kept = list(range(head)) + list(range(start, n))
    for i, k in enumerate(kept):  # every token keeps its characters
        if r.offsets[i] is not None and full.offsets[k] is not None:
            assert r.text[slice(*r.offsets[i])] == full.text[slice(*full.offsets[k])]
    for view in VIEWS:
        assert all(lab in (IGNORE, t) for lab, t in zip(r.labels(view), r.input_ids))


@given(data=st.data(), template=st.sampled_from(["smollm2", "think"]))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_reasoning_segments_keep_the_invariants(tok, data, template):
    """Invariants 1-3 with reasoning segments (`meta.reasoning`, importers' default form) among
    random ones, rendered plain, with SmolLM2's template (the default form) and with one that writes
    reasoning in its own markers: each reasoning body is rendered once, its characters its author's."""
    import copy

    from conftest import ROOT

    from dostream.toolcalls import format_reasoning

    t = tok
    if template == "think":
        t = copy.deepcopy(tok)
        t.chat_template = (ROOT / "tests/fixtures/import/think_template.jinja").read_text()
    stream = data.draw(streams(tok))
    bodies = []
    for at in sorted(data.draw(st.sets(st.integers(0, len(stream.segments)), min_size=1, max_size=2)), reverse=True):
        author = data.draw(st.sampled_from(["agent", "teacher", "oracle"]))
        body = data.draw(text_st.filter(lambda x: x.strip("\n") == x))
        bodies.append((author, body))
        seg = Segment(author, format_reasoning(body), role="assistant", meta={"reasoning": True})
        stream.segments.insert(at, seg)
    for chat in (False, True):
        r = Renderer(t, chat_template=chat).render(stream)
        check_common(r, t)
        for g in r.segments:
            for o, a in zip(r.offsets, r.authors):
                if o and g["start"] <= o[0] < g["end"]:
                    assert a == g["author"]
        rendered = [(g["author"], r.text[g["start"] : g["end"]]) for g in r.segments]
        for author, body in bodies:
            shown = f"<reasoning>{body}</reasoning>\n" if chat and template == "think" else format_reasoning(body)
            assert (author, shown) in rendered
