"""The fast decode step is the model's own forward, token by token, up to float rounding."""

import pytest
import torch
from conftest import seeded, small_config

from dostream.cached_forward import CachedForward
from dostream.sampling import SamplingConfig, cache_kwarg, sample
from dostream.sampling.prefill import _prefill

PROMPTS = ["Question:\nWhat is 2+2?\n\nProposed solution:\n", "Hi", "The resistor carries 2 A at 4 ohm, so"]


@pytest.fixture(scope="module")
def models(tok):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    llama = seeded(lambda: LlamaForCausalLM(small_config(LlamaConfig, tok)))
    lora = seeded(
        lambda: get_peft_model(
            LlamaForCausalLM(small_config(LlamaConfig, tok)),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
        )
    )  # random B: not the identity
    qwen2 = seeded(lambda: Qwen2ForCausalLM(small_config(Qwen2Config, tok)))  # biased q, k, v projections
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for layer in qwen2.model.layers:  # transformers initialises biases to zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return {"llama": llama, "lora": lora, "qwen2": qwen2}


@pytest.mark.parametrize("which", ["llama", "lora", "qwen2"])
@pytest.mark.parametrize("fast_linear", [True, False])
def test_step_equals_the_models_forward(models, tok, which, fast_linear):
    model = models[which]
    base = model.get_base_model() if which == "lora" else model
    step = CachedForward(base, fast_linear=fast_linear)
    if fast_linear and which == "lora":  # the adapted projections take the fast path too
        layer = base.model.layers[0]
        assert step.layers[0].q is not layer.self_attn.q_proj and step.layers[0].up is not layer.mlp.up_proj
    prompts = [tuple(tok(p)["input_ids"]) for p in sorted(PROMPTS, key=len)]  # left padded, of 3 lengths
    width = max(map(len, prompts))
    ours, logits, mask, reserved = _prefill(model, prompts, tok.pad_token_id, width + 8)
    theirs = _prefill(model, prompts, tok.pad_token_id, width + 8)[0]
    assert reserved
    position = torch.tensor([[len(p) - 1] for p in prompts])
    with torch.inference_mode():
        for t in range(6):
            nxt = logits.argmax(-1)
            mask, position = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1), position + 1
            got = step(nxt[:, None], position, mask, ours)
            logits = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=position,
                **{cache_kwarg(model): theirs},
                use_cache=True,
            ).logits[:, -1]
            torch.testing.assert_close(got, logits, atol=2e-5, rtol=1e-4)
            if t == 2:  # the sampler drops finished rows: both caches keep rows 0 and 2
                keep = torch.tensor([0, 2])
                ours.batch_select_indices(keep), theirs.batch_select_indices(keep)
                mask, position, logits, prompts = mask[keep], position[keep], logits[keep], prompts[::2]
    if which == "lora":  # the adapter took part: its logits are not the base model's
        with model.disable_adapter(), torch.inference_mode():
            plain = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position).logits[:, -1]
        assert not torch.allclose(plain, logits, atol=1e-3)


@pytest.mark.parametrize("which", ["llama", "lora", "qwen2"])
def test_prefill_equals_the_models_forward(models, tok, which):
    """The step also prefills: several new tokens per row, left padded, causal among themselves."""
    model = models[which]
    step = CachedForward.build(model)
    prompts = [tuple(tok(p)["input_ids"]) for p in PROMPTS * 2]
    prompts[-1] = prompts[-1][:-3]
    prompts.sort(key=len)  # lengths 1, 1, 10, 13, 17, 17: the second bucket is left padded
    width = max(map(len, prompts))
    with torch.inference_mode():
        ours, got, mask, _ = _prefill(model, prompts, tok.pad_token_id, width + 4, step)
        theirs, want, _, _ = _prefill(model, prompts, tok.pad_token_id, width + 4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    real = mask.bool()[:, None, :, None]  # keys and values of real tokens (padding holds anything finite)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.isfinite(a.keys).all() and torch.isfinite(a.values).all()
        torch.testing.assert_close(a.keys * real, b.keys * real, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a.values * real, b.values * real, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["llama", "lora", "qwen2"])
@pytest.mark.parametrize("fast", [True, False])
def test_a_prefill_on_cached_prefixes_equals_the_whole_prompts(models, tok, which, fast):
    """Rows prefilled on cached prefixes (of two lengths, one row with none, remainders of several
    lengths in one bucket: left padding before the prefix and between it and the new tokens) hold
    the keys, values and logits of a prefill of their whole prompts, in its layout."""
    from dostream.sampling import PrefixCache

    model = models[which]
    step = CachedForward.build(model) if fast else None
    head = tuple(tok("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\n")["input_ids"])
    tails = [tuple(tok(p)["input_ids"]) for p in PROMPTS]
    prompts = [head + tails[0], head + tails[1], head + tails[2], head + tails[0][:3] + tails[2][:-4], tails[2]]
    cache = PrefixCache(model, min_tokens=2)
    with torch.inference_mode():
        # Two prompts seen before: head + tails[0][:3] becomes an entry, then the head; the first
        # prompt is sent again: all but its last token.
        cache.hits([head + tails[0], head + tails[0][:3] + tails[1]], tok.pad_token_id, step)
        hits = cache.hits(prompts, tok.pad_token_id, step)
        assert [len(h.ids) if h else 0 for h in hits] == [len(prompts[0]) - 1, len(head), len(head), len(head) + 3, 0]
        pairs = sorted(zip(prompts, hits), key=lambda u: (len(u[0]) - (len(u[1].ids) if u[1] else 0), u[0]))
        prompts, hits = [p for p, _ in pairs], [h for _, h in pairs]
        width = max(map(len, prompts))
        ours, got, mask, _ = _prefill(model, prompts, tok.pad_token_id, width + 4, step, hits)
        theirs, want, _, _ = _prefill(model, prompts, tok.pad_token_id, width + 4, step)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    real = mask.bool()[:, None, :, None]
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.isfinite(a.keys).all() and torch.isfinite(a.values).all()
        torch.testing.assert_close(a.keys * real, b.keys * real, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a.values * real, b.values * real, atol=2e-5, rtol=1e-4)


def test_greedy_sampling_with_and_without_the_step_agree(models, tok):
    # Greedy: a sampled token may flip where rounding moves a CDF boundary past the row's uniform.
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    for which in ("llama", "lora", "qwen2"):
        cfg = SamplingConfig(greedy=True, max_new_tokens=12)
        fast = sample(models[which], tok, prompts, cfg)
        slow = sample(models[which], tok, prompts, SamplingConfig(**{**cfg.__dict__, "fast_step": False}))
        assert fast == slow


def test_layers_the_fast_path_does_not_know_are_called_as_they_are(tok):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dostream.cached_forward import _linear

    dora = seeded(
        lambda: get_peft_model(
            LlamaForCausalLM(small_config(LlamaConfig, tok)), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
        )
    )
    q = dora.get_base_model().model.layers[0].self_attn.q_proj
    assert _linear(q) is q  # DoRA: PEFT's own forward
    with dora.disable_adapter():
        assert _linear(q) is q
    assert _linear(q.base_layer) is not q.base_layer
    half = torch.nn.Linear(4, 4).half()  # a dtype the oneDNN products are not used for
    assert _linear(half) is half


def test_other_architectures_get_no_step(tok):
    from transformers import MistralConfig, MistralForCausalLM

    windowed = seeded(lambda: MistralForCausalLM(small_config(MistralConfig, tok, sliding_window=6)))
    assert CachedForward.build(windowed) is None
    full = seeded(lambda: MistralForCausalLM(small_config(MistralConfig, tok, sliding_window=None)))
    assert CachedForward.build(full) is not None


@pytest.mark.parametrize("which", ["llama", "lora", "qwen2"])
def test_rows_join_in_the_decode_steps_forward(models, tok, which):
    """A join is prefilled in the same forward as the running rows' next tokens (`CachedForward.many`),
    never in a forward of its own, and rows that end come back before any further forward; every
    row's logits equal those of a decode of it alone, forward by forward."""
    from dostream.sampling import Decode

    model = models[which]
    step = CachedForward.build(model)
    calls = []
    many = step.many
    step.many = lambda parts: calls.append(len(parts)) or many(parts)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    cfg = SamplingConfig(greedy=True, max_new_tokens=6, eos_token_ids=())
    short = SamplingConfig(greedy=True, max_new_tokens=2, eos_token_ids=())
    with torch.inference_mode():
        run = Decode(model, tok, forward=step)
        run.add([prompts[0]], [(0, 0)], [cfg], ["a"])
        run.step()  # the first prefill: one forward
        assert calls == [1]
        run.add([prompts[1], prompts[2]], [(0, 0), (0, 0)], [short, cfg], ["b", "c"])
        run.step()  # a's next token and b's, c's prompts (two buckets): one forward of three parts
        assert calls == [1, 3] and run.active == 3
        ended = run.step()  # b drew its 2nd token and ended: back before a further forward
        assert [row.tag for row in ended] == ["b"] and calls == [1, 3, 1]
        done = {}
        while run.active:
            done.update({row.tag: row.ids for row in run.step()})
        assert len(calls) == 7  # one forward per step, the join included
        for tag, p in (("a", prompts[0]), ("c", prompts[2])):
            alone = Decode(model, tok, forward=CachedForward.build(model))
            alone.add([p], [(0, 0)], [cfg], [tag])
            got = {}
            while alone.active:
                got.update({row.tag: row.ids for row in alone.step()})
            assert got[tag] == done[tag]


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_bf16_prefill_and_step_close_to_the_models_forward(models, tok, which):
    """bf16 attends with torch's fused attention on the strided cache: the model's forward up to
    bf16 rounding, padding rows finite."""
    import copy

    model = copy.deepcopy(models[which]).to(torch.bfloat16)
    step = CachedForward.build(model)
    prompts = sorted((tuple(tok(p)["input_ids"]) for p in PROMPTS), key=len)
    width = max(map(len, prompts))
    with torch.inference_mode():
        ours, got, mask, _ = _prefill(model, prompts, tok.pad_token_id, width + 4, step)
        theirs, want, _, _ = _prefill(model, prompts, tok.pad_token_id, width + 4)
        torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
        for layer in ours.layers:
            assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        nxt = got.float().argmax(-1)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        a = step(nxt[:, None], position, mask, ours)
        b = model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=position, **{cache_kwarg(model): theirs}
        ).logits[:, -1]
    torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.05)
