"""Sampling: exact ids, parity with transformers' generate, stopping, seeding, padding, the CLI.

Tiny random Llama models with the real SmolLM2 tokenizer only: a random model samples arbitrary
byte-level tokens (broken UTF-8 included), which is the hard case for exact-id round trips.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import seeded, small_config

from dostream import sampling
from dostream.models import tiny_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig, agent_segment, decode, generate_for_streams, sample
from dostream.sampling.pick import _pick
from dostream.stream import Segment, Stream

PROMPTS = ["Question:\nWhat is 2+2?\n\nProposed solution:\n", "Hi", "The resistor carries 2 A at 4 ohm, so the voltage"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0).eval()


@pytest.fixture(scope="module")
def decisive(tok):
    """Untied, larger weights: greedy outputs vary and argmax margins are wide (the project's tiny
    model repeats one token under greedy decoding), so parity checks are not vacuous."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return seeded(lambda: LlamaForCausalLM(small_config(LlamaConfig, tok)))


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def test_sampled_ids_round_trip_through_renderer(model, tok):
    for chat in (False, True):
        renderer = Renderer(tok, chat_template=chat)
        streams = [
            Stream(f"s{i}", [Segment("user", p), Segment("protocol", "Answer: ")]) for i, p in enumerate(PROMPTS)
        ]
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=3)
        samples = generate_for_streams(model, renderer, streams, cfg)
        for stream, s in zip(streams, samples):
            prompt = renderer.prompt_ids(stream)
            assert s.prompt_len == len(prompt) and len(s.token_ids) == 24 and s.finish_reason == "length"
            assert s.text == decode(tok, s.token_ids)
            stream.segments.append(agent_segment(s))
            r = renderer.render(stream)
            # The stream is re-rendered with the agent turn: what the model conditioned on, then
            # exactly the ids it sampled, owned by the agent.
            n = len(prompt) + len(s.token_ids)
            assert r.input_ids[:n] == prompt + s.token_ids
            assert r.authors[len(prompt) : n] == ["agent"] * len(s.token_ids)
            assert all(not sup for sup in r.supervised("interventional")[len(prompt) : n])


@pytest.fixture(scope="module")
def sliding(tok):
    """A model whose cache layers are sliding windows (Mistral): the sampler's stock-cache path."""
    from transformers import MistralConfig, MistralForCausalLM

    return seeded(lambda: MistralForCausalLM(small_config(MistralConfig, tok, sliding_window=6)))


@pytest.mark.parametrize("which", ["decisive", "sliding"])
def test_greedy_equals_generate_with_left_padding(which, request, tok, monkeypatch):
    model = request.getfixturevalue(which)
    monkeypatch.setattr(sampling.decoding, "_RESERVE_FIRST", 3)  # the reserved KV cache must grow, twice
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ours = sample(
        model,
        tok,
        [tok(p)["input_ids"] for p in PROMPTS],
        SamplingConfig(greedy=True, max_new_tokens=20, precision="fp32"),
    )
    with torch.inference_mode():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    for row, s in zip(ref[:, enc["input_ids"].shape[1] :].tolist(), ours):
        if tok.eos_token_id in row:  # generate pads after EOS; we stop
            row = row[: row.index(tok.eos_token_id) + 1]
        assert s.token_ids == row


def test_left_padding_alone_equals_in_batch(decisive, tok, prompts):
    model = decisive
    cfg = SamplingConfig(greedy=True, max_new_tokens=16)
    short = min(prompts, key=len)
    alone = sample(model, tok, [short], cfg)[0]
    batched = sample(model, tok, prompts + [short + short], cfg)
    assert batched[prompts.index(short)].token_ids == alone.token_ids


@pytest.mark.parametrize("greedy", [True, False])
def test_stop_strings_and_eos_per_row(decisive, tok, prompts, greedy):
    model = decisive
    cfg = SamplingConfig(greedy=greedy, temperature=0.7, max_new_tokens=16, seed=5, precision="fp32")
    free = sample(model, tok, prompts, cfg)
    # A stop string that row 0 completes at its 6th token (the token's own text, first seen there).
    target = free[0].token_ids
    k = next(
        k
        for k in range(5, 16)
        if decode(tok, target[k : k + 1]).strip() and decode(tok, target[k : k + 1]) not in decode(tok, target[:k])
    )
    stop = decode(tok, target[k : k + 1])
    # An EOS id that row 1 samples at its 4th token (if it was not sampled earlier).
    eos_id = free[1].token_ids[3]
    first_eos = free[1].token_ids.index(eos_id)
    out = sample(
        model,
        tok,
        prompts,
        SamplingConfig(
            greedy=greedy,
            temperature=0.7,
            max_new_tokens=16,
            seed=5,
            precision="fp32",
            stop=(stop,),
            eos_token_ids=(eos_id,),
        ),
    )
    assert out[0].finish_reason == "stop" and out[0].token_ids == target[: k + 1]
    assert out[0].text.endswith(stop)
    assert out[1].finish_reason == "eos" and out[1].token_ids == free[1].token_ids[: first_eos + 1]
    assert out[1].text == decode(tok, out[1].token_ids)  # the EOS token is kept and decoded
    for s, f in zip(out[2:], free[2:]):  # rows that never stop are untouched by the others stopping
        cut = [j for j in range(16) if f.token_ids[j] == eos_id or stop in decode(tok, f.token_ids[: j + 1])]
        assert s.token_ids == (f.token_ids[: cut[0] + 1] if cut else f.token_ids)


def test_stop_string_inside_a_token_keeps_the_whole_token(decisive, tok, prompts):
    model = decisive
    free = sample(model, tok, prompts[:1], SamplingConfig(greedy=True, max_new_tokens=16))[0]
    # A stop string made of the tail of one token and the head of the next.
    k = next(
        k
        for k in range(2, 15)
        if len(decode(tok, free.token_ids[k : k + 1])) >= 2 and decode(tok, free.token_ids[:k]).strip()
    )
    text_k = decode(tok, free.token_ids[: k + 1])
    stop = text_k[-len(decode(tok, free.token_ids[k : k + 1])) - 1 : -1]  # ends inside token k
    first = next(j for j in range(16) if stop in decode(tok, free.token_ids[: j + 1]))
    out = sample(model, tok, prompts[:1], SamplingConfig(greedy=True, max_new_tokens=16, stop=stop))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


class Scripted(torch.nn.Module):
    """A model that writes a fixed script: the wrapped model runs (and fills the cache) as usual,
    then every row's logits are replaced by a one-hot on the script's next token."""

    def __init__(self, model, prompt_lens: list[int], script: list[list[int]]):
        super().__init__()
        self.model, self.config, self.prompt_lens, self.script = model, model.config, prompt_lens, script

    def forward(self, input_ids, position_ids, **kwargs):
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        # A prefill predicts each row's token 0; the t-th decode step after it, token t + 1. Rows
        # are told apart by prompt length: the last position is prompt_len - 1 + index.
        self.steps = 0 if input_ids.shape[1] > 1 else self.steps + 1
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
        for b, pos in enumerate(position_ids[:, -1].tolist()):
            row = self.prompt_lens.index(pos + 1 - self.steps)
            logits[b, 0, self.script[row][self.steps]] = 0.0
        out.logits = logits
        return out


def test_stop_strings_split_across_byte_tokens(model, tok):
    """Stop strings made of multi-byte characters that byte-level tokens split (🙂 is two tokens,
    本 is one, 日 three), far from the start of the row: found by their completing token."""
    texts = ["filler " * 12 + "ok 🙂🙂 then more", "x" * 30 + " 日本語 and on and on", "no stop here at all, just text"]
    script = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    prompts = [[1] * (3 + 5 * r) for r in range(3)]  # distinct lengths identify the rows
    scripted = Scripted(model, [len(p) for p in prompts], script)
    out = sample(scripted, tok, prompts, SamplingConfig(greedy=True, max_new_tokens=40, stop=("🙂🙂", "日本")))
    for row, stop in ((0, "🙂🙂"), (1, "日本")):
        first = next(j for j in range(len(script[row])) if stop in decode(tok, script[row][: j + 1]))
        assert out[row].token_ids == script[row][: first + 1] and out[row].finish_reason == "stop"
        assert out[row].text.endswith(stop)
    assert out[2].token_ids == script[2] and out[2].finish_reason == "eos"  # EOS sampled, kept


def test_seeded_and_independent_of_batch_composition(model, tok, prompts):
    cfg = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=7)
    a = sample(model, tok, prompts, cfg)
    assert a == sample(model, tok, prompts, cfg)
    assert a != sample(model, tok, prompts, SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=8))
    # Row i's randomness is its own: the same with other prompts around it, one row per batch,
    # or the prompt repeated (n samples of one prompt share one prefill, not one random stream).
    assert sample(model, tok, prompts[:1], cfg)[0] == a[0]
    alone = sample(
        model, tok, prompts, SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=7, batch_size=1)
    )
    # Row 2 is left padded in the batch (prefilled with the longer row 0): its logits differ from
    # its unpadded ones by float rounding (~1e-7), enough to flip a draw from this flat model.
    assert alone[:2] == a[:2]
    same = sample(model, tok, [prompts[0]] * 4, cfg)
    assert same[0] == a[0] and len({tuple(s.token_ids) for s in same}) == 4


def _hf_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    z = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        z = TopPLogitsWarper(top_p)(None, z)
    return torch.softmax(z, -1)


@pytest.mark.parametrize("scale,top_p", [(8.0, 0.9), (0.5, 0.9), (3.0, 1.0)])
def test_pick_samples_the_transformers_distribution(scale, top_p):
    """Stratified uniforms through the inverse CDF hit each token in proportion to its probability
    under transformers' temperature + top-p warpers (peaked logits: the top-64 fast path; flat
    logits: the full-sort fallback; top_p=1: no truncation)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 1000) * scale
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    cfg = SamplingConfig(temperature=0.7, top_p=top_p)
    for row in range(2):
        toks = _pick(logits[row].expand(n, -1), u, cfg)
        freq = torch.bincount(toks, minlength=1000).double() / n
        assert (freq - _hf_probs(logits[row : row + 1], 0.7, top_p)[0].double()).abs().max() <= 1.5 / n


def test_peft_adapter_bf16_copy_and_modes_restored(tok, prompts):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(1)
    cfg = SamplingConfig(greedy=True, max_new_tokens=8)
    want = sample(base, tok, prompts, cfg)
    peft_model = get_peft_model(tiny_model(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    peft_model.train()
    assert sample(peft_model, tok, prompts, cfg) == want  # a fresh LoRA is the identity; dropout is off
    assert peft_model.training and all(m.training for m in peft_model.modules())
    weight = next(base.parameters())
    low = sample(base, tok, prompts, SamplingConfig(greedy=True, max_new_tokens=8, precision="bf16"))
    assert weight.dtype == torch.float32 and all(len(s.token_ids) == 8 for s in low)


def test_empty_prompt_and_bad_config_are_clear_errors(model, tok):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(model, tok, [[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # the optional backend is never picked silently
        with pytest.raises(RuntimeError, match="needs the vllm package"):
            sample(model, tok, [[1, 2]], SamplingConfig(backend="vllm"))
    assert sample(model, tok, []) == []


def _check_cli_rows(stdout: str, tok, n: int) -> list[dict]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == n
    for r in rows:
        assert set(r) == {"prompt", "sample", "prompt_len", "token_ids", "text", "finish_reason"}
        assert decode(tok, r["token_ids"]) == r["text"]
    return rows


def test_cli_in_process_with_adapter(tmp_path, tok, capsys):
    from peft import LoraConfig, get_peft_model

    from dostream.cli.sample import cli_main

    get_peft_model(tiny_model(0), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    args = [
        "--model",
        "tiny",
        "--prompt",
        "Question:\\n2+2?\\n\\nProposed solution:\\n",
        "--prompt",
        "Hi",
        "--n",
        "2",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--stop",
        "\\n\\n",
        "--json",
    ]
    assert cli_main(args) == 0
    rows = _check_cli_rows(capsys.readouterr().out, tok, 4)
    assert [(r["prompt"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[0]["prompt_len"] == len(tok("Question:\n2+2?\n\nProposed solution:\n")["input_ids"])
    assert cli_main(args + ["--adapter", str(tmp_path / "adapter")]) == 0  # a fresh LoRA: same samples
    assert _check_cli_rows(capsys.readouterr().out, tok, 4) == rows
    assert cli_main(["--model", "tiny", "--prompt", "Hi", "--greedy", "--chat-template", "--max-new-tokens", "4"]) == 0
    assert "sample 1/1" in capsys.readouterr().out


def test_cli_options_are_sampling_config_fields():
    import dataclasses

    from dostream.cli.sample import build_parser

    args = build_parser().parse_args([])
    # Every field but the ids (no command-line form) is an option; the defaults are today's.
    assert {f.name for f in dataclasses.fields(SamplingConfig)} - set(vars(args)) == {"eos_token_ids"}
    assert (args.temperature, args.top_p, args.max_new_tokens, args.seed, args.batch_size) == (1.0, 1.0, 64, 0, 64)
    assert (args.greedy, args.precision, args.backend, args.stop, args.n) == (False, "auto", "auto", [], 1)
    args = build_parser().parse_args(["--greedy", "--stop", "a", "--stop", "b", "--max-new-tokens", "3"])
    assert (args.greedy, args.stop, args.max_new_tokens) == (True, ["a", "b"], 3)


def test_cli_subprocess(tok):
    from dostream.cli.main import COMMANDS

    # `dostream sample` once the dispatcher lists it; the module itself until then.
    entry = ["-m", "dostream.cli", "sample"] if "sample" in COMMANDS else ["-m", "dostream.cli.sample"]
    proc = subprocess.run(
        [
            sys.executable,
            *entry,
            "--model",
            "tiny",
            "--prompt",
            "Hello",
            "--n",
            "3",
            "--max-new-tokens",
            "5",
            "--seed",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_cli_rows(proc.stdout, tok, 3)
    assert "tokens/s" in proc.stderr


# -- the running decode: rows join and leave (continuous batching) ----------------------------------
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_rows_joining_a_running_decode_draw_what_they_draw_alone(decisive, tok, prompts, greedy, fast, monkeypatch):
    """Rows added between steps, longer than the running rows (the live block widens on the left,
    storage is laid out again) and more than the slots (they grow), each with its own budget and
    settings; rows leave at different steps (the last rows move into their slots, padding columns
    are dropped): each row's ids are those it samples alone, seeded by its own (seed, j)."""
    from dostream.cached_forward import CachedForward
    from dostream.sampling import Decode

    monkeypatch.setattr(sampling.decoding, "_RESERVE_FIRST", 2)  # the cache must also grow while rows join
    configs = [
        SamplingConfig(greedy=greedy, temperature=0.8, max_new_tokens=n, seed=s, precision="fp32")
        for n, s in ((5, 1), (24, 2), (3, 3), (9, 4), (7, 5))
    ]
    rows = [(prompts[1], 0), (prompts[0], 1), (prompts[2], 2), (prompts[2] + prompts[0], 3), (prompts[1], 4)]
    alone = [sample(decisive, tok, [p], c, row_seeds=[(c.seed, j)])[0] for (p, j), c in zip(rows, configs)]
    assert len({len(s.token_ids) for s in alone}) > 2  # they end at different steps
    forward = CachedForward.build(decisive) if fast else None
    run, got, drawn = Decode(decisive, tok, forward=forward), {}, {}

    def join(k):
        (p, j), c = rows[k], configs[k]
        hook = lambda t, k=k: drawn.setdefault(k, []).append(t)  # noqa: E731
        run.add([p], [(c.seed, j)], [c], [k], hooks=[hook])

    join(0)
    for step in range(60):
        if step == 1:
            join(1)
            join(2)
        if step == 3:
            join(3)  # the longest prompt, into a running decode
        if step == 4:
            join(4)
        for row in run.step():
            got[row.tag] = row
        if not run.active and len(got) == len(rows):
            break
    for k, s in enumerate(alone):
        assert got[k].ids == s.token_ids and got[k].reason == s.finish_reason, k
        assert drawn[k] == s.token_ids  # the hook saw every token as it was drawn


# -- prefix caching: prompts that share leading tokens prefill only the rest ------------------------
@pytest.fixture(scope="module")
def chats(tok):
    """Chat prompts as the server renders them: the template's head and default system prompt, then
    user turns of several lengths (one sent twice, one a conversation going on)."""
    renderer = Renderer(tok, chat_template=True)
    turns = ["What is 2+2?", "Hi", "The resistor carries 2 A at 4 ohm, so what is the voltage?", "Name a colour."]
    prompts = [renderer.prompt_ids(Stream(str(i), [Segment("user", t, role="user")])) for i, t in enumerate(turns)]
    go_on = Stream("c", [Segment("user", turns[1], role="user"), Segment("teacher", "Hello!", role="assistant")])
    go_on.segments.append(Segment("user", "And then?", role="user"))
    return [*prompts, prompts[0], renderer.prompt_ids(go_on)]


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_rows_on_a_cached_prefix_draw_what_they_draw_without_it(decisive, tok, chats, greedy, fast):
    """The same rows, joining a running decode in the same waves, with a prefix cache and without:
    the same ids, and those they draw alone (the cache did make entries and rows did reuse them)."""
    from dostream.cached_forward import CachedForward
    from dostream.sampling import Decode, PrefixCache

    configs = [
        SamplingConfig(greedy=greedy, temperature=0.9, max_new_tokens=n, seed=s, precision="fp32")
        for n, s in ((6, 1), (12, 2), (4, 3), (9, 4), (7, 5), (5, 6))
    ]
    waves = {0: [0, 1], 2: [2, 3], 3: [4, 5]}  # step -> rows joining before it
    forward = CachedForward.build(decisive) if fast else None

    def run(prefix_cache):
        decode, got = Decode(decisive, tok, forward=forward, prefix_cache=prefix_cache), {}
        for step in range(40):
            for k in waves.get(step, []):
                decode.add([chats[k]], [(configs[k].seed, k)], [configs[k]], [k])
            got.update({row.tag: row.ids for row in decode.step()} if decode.active else {})
        return got

    cache = PrefixCache(decisive, min_tokens=4)
    with_cache, without = run(cache), run(None)
    alone = [
        sample(decisive, tok, [p], c, row_seeds=[(c.seed, k)])[0].token_ids
        for k, (p, c) in enumerate(zip(chats, configs))
    ]
    assert with_cache == without == dict(enumerate(alone))
    assert cache.made >= 2 and cache.reused >= 4 * 20  # the head for rows 1..5, and row 0 sent again


@pytest.mark.parametrize("fast", [True, False])
def test_a_prefill_ahead_rides_the_running_step_and_changes_nothing_drawn(decisive, tok, chats, fast):
    """`Decode.ahead`: a prompt prefilled in the running rows' next forward becomes a cache entry
    (in pieces, each on the last), also in a step that joins a row and beside another session's
    prompt asked for before the same step; the rows draw what they draw without it, and a row
    whose prompt begins with the entry draws what it draws alone."""
    from dostream.cached_forward import CachedForward
    from dostream.sampling import Decode, PrefixCache

    forward = CachedForward.build(decisive) if fast else None
    cfg = SamplingConfig(greedy=True, max_new_tokens=12, precision="fp32")
    typed = chats[5] + chats[4][1:]  # a long prompt, arriving in three pieces
    other = chats[3] + chats[2][1:]  # another session's, asked for before the same step as the last piece
    third = len(typed) // 3

    def run(ahead: bool):
        cache = PrefixCache(decisive, min_tokens=4)
        decode, got, done = Decode(decisive, tok, forward=forward, prefix_cache=cache), {}, []
        decode.add([chats[0]], [(0, 0)], [cfg], ["running"])
        for step in range(16):  # (the joining row's 12 tokens end at step 15)
            if ahead and step in (1, 3, 5):
                assert decode.ahead([tuple(typed[: len(typed) * (step + 1) // 6])], done.append)
            if ahead and step == 5:
                assert decode.ahead([tuple(other)], done.append)
            if step == 3:  # the second piece rides the step that prefills this row
                decode.add([chats[1]], [(0, 1)], [cfg], ["joining"])
            got.update({row.tag: row.ids for row in decode.step()})
        return got, cache, done

    (rode, cache, done), (plain, _, _) = run(True), run(False)
    assert rode == plain and set(rode) == {"running", "joining"}
    assert len(done) == 4 and done[-1] == 0 and sum(done) > len(typed)  # two asked in one step: counted once
    assert ("", tuple(other)) in cache._entries
    # one growing entry of the typed prompt: each piece on the last, the earlier pieces dropped
    assert [k for _, k in cache._entries if k[: third + 1] == tuple(typed[: third + 1])] == [tuple(typed)]
    later = Decode(decisive, tok, forward=forward, prefix_cache=cache)
    later.add([typed + chats[1][-3:]], [(0, 0)], [cfg], ["later"])
    got = {}
    while later.active:
        got.update({row.tag: row.ids for row in later.step()})
    assert got["later"] == sample(decisive, tok, [typed + chats[1][-3:]], cfg)[0].token_ids
    assert cache.reused >= len(typed)


def test_a_prefixed_cache_lays_each_rows_prefix_before_its_new_tokens_in_place(model):
    """`_prefixed_cache`: a row's cached prefix right before its new tokens (rows sharing one, apart
    in the bucket, each get it), the padding tokens' keys and values dropped where the prefix ends;
    the layer's update writes the new tokens into the columns reserved for them (the keys it returns
    are that storage: no concatenation) and returns what the prefix then the new tokens make."""
    from dostream.sampling.kvcache import _CachedPrefix, _prefixed_cache, _runs

    assert _runs([0, 1, 2, 5]) == [(0, 3), (5, 6)] and _runs([4]) == [(4, 5)]
    g = torch.Generator().manual_seed(0)
    layers, heads, dim = model.config.num_hidden_layers, model.config.num_key_value_heads, 8

    def kv(n):
        return [torch.randn(1, heads, n, dim, generator=g) for _ in range(layers)]

    a, b = _CachedPrefix((1, 2, 3), kv(3), kv(3)), _CachedPrefix((4, 5), kv(2), kv(2))
    hits, rest, new = [a, None, a, b], [2, 5, 1, 3], 5
    width = max(len(h.ids) + n if h else n for h, n in zip(hits, rest))
    cache = _prefixed_cache(model.config, hits, rest, width, new)
    for i, layer in enumerate(cache.layers):
        k_new, v_new = torch.randn(4, heads, new, dim, generator=g), torch.randn(4, heads, new, dim, generator=g)
        keys, values = layer.update(k_new, v_new)
        assert keys.data_ptr() == layer.whole[0].data_ptr() and keys.shape == (4, heads, width, dim)
        for r, (h, n) in enumerate(zip(hits, rest)):
            for got, fresh, old in ((keys, k_new, "keys"), (values, v_new, "values")):
                assert torch.equal(got[r, :, width - n :], fresh[r, :, new - n :])  # the row's new tokens
                if h is not None:  # its prefix right before them
                    assert torch.equal(got[r, :, width - n - len(h.ids) : width - n], getattr(h, old)[i][0])
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_prefix_cache_is_one_models_and_keeps_few_exact_entries(decisive, model, tok, chats):
    from dostream.sampling import Decode, PrefixCache
    from dostream.sampling.prefix import _common

    cache = PrefixCache(decisive, entries=2, min_tokens=4)
    with pytest.raises(ValueError, match="another model"):
        Decode(model, tok, prefix_cache=cache)  # (a hot swap starts a new cache)
    first, hi, resistor, _, again, going_on = map(tuple, chats)
    with torch.inference_mode():
        hits = cache.hits([first, hi], tok.pad_token_id, None)
        head = hits[0].ids
        assert hits[1] is hits[0] and len(head) == _common(first, hi) >= 20 and cache.made == 1
        # a conversation going on: its earlier prompt is no entry, the head serves it
        assert cache.hits([going_on], tok.pad_token_id, None)[0].ids == head and cache.made == 1
        # sent again: all but its last token; two entries at most, the least recently used goes
        assert cache.hits([again], tok.pad_token_id, None)[0].ids == first[:-1]
        assert cache.hits([resistor, resistor], tok.pad_token_id, None)[0].ids == head  # (seen once: the head)
        assert cache.hits([resistor], tok.pad_token_id, None)[0].ids == resistor[:-1]
    assert list(cache._entries) == [("", head), ("", resistor[:-1])] and cache.made == 3


def test_auto_precision_resolves_fp32_weights_and_keeps_reduced_ones(model, monkeypatch):
    """`precision="auto"`: fp32 weights as `device.resolve_precision` says (fp32 where bf16 is
    emulated, a bf16 copy where it is fast); weights already in bf16 (a server's --dtype) stay."""
    import copy

    import dostream.device as dev
    from dostream.sampling.generate import _in_precision

    monkeypatch.setattr(dev, "bf16_speedup", lambda device_type: 0.006)
    assert _in_precision(model, "auto") is model
    monkeypatch.setattr(dev, "bf16_speedup", lambda device_type: 7.0)
    assert next(_in_precision(model, "auto").parameters()).dtype == torch.bfloat16
    low = copy.deepcopy(model).to(torch.bfloat16)
    assert _in_precision(low, "auto") is low and next(model.parameters()).dtype == torch.float32
