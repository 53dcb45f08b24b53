"""What the server tests share: a real `dostream serve` app on 127.0.0.1 (`running`), the official
`openai` client, the tiny models, and the `served` and `tool_server` servers, one each for the
whole session (a plugin of the root conftest: every server test module shares them)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from conftest import small_config

from dostream.sampling import cache_kwarg
from dostream.serve.app import ServeConfig, Server
from dostream.serve.protocol import Limits
from dostream.serve.store import ServeStore
from dostream.stream import Stream

KEY = "sk-test-admin"


@contextlib.contextmanager
def running(server: Server):
    """Serve `server.app()` with uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    u = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning"))
    thread = threading.Thread(target=u.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not u.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        u.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def decisive_model(tok, seed: int = 0):
    """conftest's small untied model with larger weights still (std 0.5): peaked distributions, so
    float rounding cannot flip a seeded draw."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = small_config(LlamaConfig, tok, max_position_embeddings=2048)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def served(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("serve")
    server = Server(
        ServeConfig(
            model="tiny", store=str(store), precision="fp32", limits=Limits(max_body=64_000, max_tokens=64, max_n=4)
        ),
        env_key=KEY,
        model=decisive_model(tok),
        tok=tok,
    )
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, store=server.store, dir=store)


def streams_of(store: ServeStore, conversation: str) -> list[Stream]:
    return store.conversation_streams(conversation)


def conv_of(raw) -> str:
    return raw.headers["x-conversation-id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scripted(torch.nn.Module):
    """Writes a fixed script whatever the prompt: the wrapped model fills the cache as usual, then
    every row's logits are a one-hot on the script's next token (step 0 at a prefill)."""

    def __init__(self, model, script: list[int]):
        super().__init__()
        self.model, self.config, self.script, self.steps = model, model.config, script, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **kwargs):
        kw = {cache_kwarg(self.model): cache if cache is not None else kwargs.get("past_key_values")}
        self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kw)
        # A decode step runs on the sampler's reserved cache; a prefill (a whole prompt, or the rest
        # after a cached prefix, which may be one token) on another.
        layers = getattr(next(iter(kw.values())), "layers", None) or [None]
        self.steps = self.steps + 1 if type(layers[0]).__name__ == "ReservedLayer" else 0
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)
        logits[..., self.script[min(self.steps, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        },
    }
]


def serve_process(store, port: int, *flags: str, start_s: float = 120) -> subprocess.Popen:
    """`dostream serve --model tiny --store STORE FLAGS...` as a user starts it (one OpenMP thread),
    returned once `/health` answers (within `start_s`); its stderr is kept for the failure message."""
    env = {**os.environ, "DOSTREAM_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dostream.cli", "serve", "--model", "tiny", "--store", str(store), *flags]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + start_s
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)


@pytest.fixture(scope="session")
def tool_server(tok, tmp_path_factory):
    """A server whose model always writes one call of `add` (the tool-call convention), then ends."""
    from dostream.models import tiny_model

    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    script = tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    server = Server(
        ServeConfig(model="tiny", store=str(tmp_path_factory.mktemp("tools")), precision="fp32", fast_step=False),
        env_key=KEY,
        model=Scripted(tiny_model(), script),
        tok=tok,
    )
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, store=server.store)


def wait_for(what, timeout: float = 120):
    """Poll `what()` until it is truthy; returns it."""
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def random_lora(base, seed: int, where=None):
    """A PEFT LoRA of a copy of `base` on every linear layer with random weights (N(0, 0.6): its
    answers differ from the base's), saved at `where` if given; returns the `PeftModel` (the
    reference: that adapter alone)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        ).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.6)
    if where is not None:
        model.save_pretrained(where)
    return model
