"""Log-probs from the decode loop: the drawn token's raw log-prob (the model's own distribution,
before temperature, top-p and constraints) equals `scoring.logprobs_at` on the same ids, whatever
shares the batch and whenever a row joined; rows without them get None and pay nothing."""

import pytest
from conftest import scored_after, seeded, small_config

from dostream.cached_forward import CachedForward
from dostream.sampling import Decode, SamplingConfig, sample

PROMPTS = ["Question:\nWhat is 2+2?\n\nProposed solution:\n", "Hi", "The resistor carries 2 A at 4 ohm, so"]


@pytest.fixture(scope="module")
def decisive(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    return seeded(lambda: LlamaForCausalLM(small_config(LlamaConfig, tok))).eval()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def _check(model, prompt, ids, logprobs, top, k):
    assert len(logprobs) == len(top) == len(ids)
    assert logprobs == pytest.approx(scored_after(model, prompt, ids), abs=1e-4)
    for tok, lp, alts in zip(ids, logprobs, top):
        assert len(alts) == k
        values = [v for _, v in alts]
        assert values == sorted(values, reverse=True)  # most likely first
        if alts:
            assert lp <= values[0] + 1e-6
        for i, v in alts:
            if i == tok:
                assert v == pytest.approx(lp, abs=1e-6)


@pytest.mark.parametrize("greedy", [True, False])
def test_logprobs_of_rows_joining_a_running_decode_match_scoring(decisive, tok, prompts, greedy):
    """Rows join mid-decode, some with log-probs (different k), some without; temperature and
    top-p change what is drawn, not the reported (raw) log-probs."""
    configs = [
        SamplingConfig(
            greedy=greedy, temperature=0.7, top_p=0.9, max_new_tokens=n, seed=s, precision="fp32", logprobs=k
        )
        for n, s, k in ((6, 1, 2), (9, 2, None), (4, 3, 0), (7, 4, 5))
    ]
    rows = [prompts[1], prompts[0], prompts[2], prompts[2] + prompts[1]]
    run, got, hooked = Decode(decisive, tok, forward=CachedForward.build(decisive)), {}, {}

    def join(k):
        hook = lambda t, *scored, k=k: hooked.setdefault(k, []).append(scored)  # noqa: E731
        run.add([rows[k]], [(configs[k].seed, k)], [configs[k]], [k], hooks=[hook])

    join(0)
    for step in range(40):
        if step == 1:
            join(1)
            join(2)
        if step == 3:
            join(3)
        got.update({row.tag: row.sample(tok) for row in run.step()})
        if not run.active and len(got) == len(rows):
            break
    for k, c in enumerate(configs):
        s = got[k]
        if c.logprobs is None:
            assert s.logprobs is None and s.top_logprobs is None and all(h == () for h in hooked[k])
            continue
        _check(decisive, rows[k], s.token_ids, s.logprobs, s.top_logprobs, c.logprobs)
        assert [h[0] for h in hooked[k]] == list(zip(s.logprobs, s.top_logprobs))  # the hook saw them as drawn
        alone = sample(decisive, tok, [rows[k]], c, row_seeds=[(c.seed, k)])[0]
        assert alone.token_ids == s.token_ids  # asking for log-probs changes nothing drawn


def test_constrained_tokens_report_the_models_raw_logprob(decisive, tok, prompts):
    """Under a grammar (a forced tool call) the reported log-probs are still the raw distribution's."""
    from dostream.sampling.grammar import tool_grammar

    forced = '<tool_call>\n{"name": "xyz"'
    cfg = SamplingConfig(greedy=True, max_new_tokens=20, logprobs=1, precision="fp32")
    run = Decode(decisive, tok)
    run.add(
        [prompts[0]],
        [(0, 0)],
        [cfg],
        ["forced"],
        grammars=[tool_grammar(tok, [("xyz", None)], required=True, parallel=False)],
    )
    done = {}
    while run.active:
        done.update({row.tag: row.sample(tok) for row in run.step()})
    s = done["forced"]
    assert s.grammar == "tool_calls" and s.text.startswith(forced)
    _check(decisive, prompts[0], s.token_ids, s.logprobs, s.top_logprobs, 1)


def test_sample_passes_them_through_and_none_without(decisive, tok, prompts):
    on = sample(decisive, tok, prompts, SamplingConfig(max_new_tokens=5, logprobs=3, precision="fp32"))
    off = sample(decisive, tok, prompts, SamplingConfig(max_new_tokens=5, precision="fp32"))
    for p, a, b in zip(prompts, on, off):
        assert a.token_ids == b.token_ids and b.logprobs is None and b.top_logprobs is None
        _check(decisive, p, a.token_ids, a.logprobs, a.top_logprobs, 3)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingConfig(logprobs=21)
