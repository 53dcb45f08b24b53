"""Real agent frameworks from the package registry against a real `dostream serve` process on the
embedded SmolLM2-135M-Instruct (issue #33): the OpenAI Agents SDK with its default model (the
Responses API), LangChain's `ChatOpenAI` and pydantic-ai (chat completions) each complete a forced
tool-calling round trip and a structured output; lm-evaluation-harness's `local-completions` scores
a small local task (`lm_eval_task/`: a YAML task over a JSONL file) through `/v1/completions`.
After each, the conversations are exported (`dostream streams export`, as a user does) and every
recorded sample is checked the way the other server tests check it: the stream renders, the prompt
each turn was sampled from is the rendering of the stream before it (its length the exchange's
`prompt_tokens`), the sampled ids follow it exactly, and the tokens drawn under a constraint
(`tool_choice` required/named, `response_format`/`text.format`) are marked in the agent segment's
meta (`constrained_by`).

The frameworks are the `frameworks` extra (`pip install -e ".[test,frameworks]"`; `make test-slow`
installs it); each test is skipped when its framework is missing."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli
from harness import KEY, _free_port, serve_process
from pydantic import BaseModel

from dostream.render import Renderer
from dostream.serve.store import ServeStore
from dostream.stream import Stream, read_streams

pytestmark = pytest.mark.slow  # a SmolLM2-135M server and several framework runs: `make test-slow`

MODEL = "smollm2"  # the embedded default; the API's model id is the --model NAME
# Greedy, SmolLM2-135M calls `add(2, 3)` when forced, then (asked to reply in words) answers in text
# rather than calling again, as it does when only told to use the tool.
QUESTION = "What is 2 + 3? Reply in words after using the tool."
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"


class City(BaseModel):
    """The structured output type every framework asks for."""

    name: str
    country: str


# -- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """`dostream serve --model smollm2` as a user starts it, on 127.0.0.1, once for the module."""
    store, port = tmp_path_factory.mktemp("frameworks"), _free_port()
    proc = serve_process(store, port, "--model", MODEL)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", dir=store)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _conversations(smol) -> set[str]:
    store = ServeStore.open_dir(smol.dir, read_only=True)
    try:
        return set(store.conversations())
    finally:
        store.close()


def _requests(smol) -> dict[str, dict]:
    """Each recorded exchange's request (its settings, choices and usage), by completion id."""
    store = ServeStore.open_dir(smol.dir, read_only=True)
    try:
        return {cid: json.loads(req) for cid, req in store.db.execute("SELECT id, request FROM exchanges")}
    finally:
        store.close()


def _exported(smol, conversations: set[str], tmp_path) -> list[Stream]:
    """`dostream streams export STORE`, the streams of `conversations`."""
    out = tmp_path / "served.jsonl"
    run_cli("streams", "export", smol.dir, "--out", out)
    streams = [s for s in read_streams(out) if s.meta["conversation"] in conversations]
    assert {s.meta["conversation"] for s in streams} == conversations
    return streams


def _expected_constraint(request: dict) -> str | None:
    """What the request constrained: the reply's grammar (`response_format`/`text.format`), or a
    forced tool call (`tool_choice` required or named)."""
    fmt = (request.get("response_format") or {}).get("type")
    if fmt in ("json_schema", "json_object"):
        return fmt
    choice = request.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        return "tool_calls"
    return None


def _check_rendered(streams: list[Stream], requests: dict[str, dict], tok, *, chat: bool = True) -> list[dict]:
    """Every stream renders (sampled ids checked against their text); each agent segment's prompt
    is the stream before it, rendered as the server renders it (chat template, open for the
    agent's turn; a completion's prompt plain), of the exchange's `prompt_tokens`, and its sampled
    ids follow that prompt exactly; constrained samples say so. Returns the agent segments' meta."""
    renderer = Renderer(tok, chat_template=True) if chat else Renderer(tok, add_eos=False)
    metas = []
    for s in streams:
        ids = renderer.render(s).input_ids
        agents = [i for i, seg in enumerate(s.segments) if seg.author == "agent"]
        assert len(agents) == len(s.meta["completions"]) >= 1, s.meta
        for i, cid in zip(agents, s.meta["completions"]):
            seg, request = s.segments[i], requests[cid]
            prompt = renderer.prompt_ids(Stream(s.id, s.segments[:i]))
            if not chat and "prompt_token_ids" in s.segments[0].meta:  # a completion sent as ids
                assert prompt == s.segments[0].meta["prompt_token_ids"]
            assert request["usage"]["prompt_tokens"] == len(prompt), (cid, s.segments[:i])
            assert ids[: len(prompt)] == prompt, cid
            assert seg.token_ids and ids[len(prompt) : len(prompt) + len(seg.token_ids)] == seg.token_ids, cid
            want = _expected_constraint(request)
            if want is not None:  # every id drawn under the grammar (a forced call: the call's, arguments too)
                assert seg.meta.get("constrained_by") == want, (cid, seg.meta)
            elif request.get("tool_choice") in (None, "none"):  # no tools: nothing drawn under a mask
                assert "constrained_by" not in seg.meta and "constrained" not in seg.meta, (cid, seg.meta)
            else:  # tools in force (`auto`): at most a strict tool's calls are held to their schema
                assert seg.meta.get("constrained_by") in (None, "text_or_tool_calls"), (cid, seg.meta)
            metas.append({"id": cid, "request": request, **seg.meta})
    return metas


def _authors(streams: list[Stream]) -> list[list[str]]:
    return [[seg.author for seg in s.segments] for s in streams]


# -- the OpenAI Agents SDK (the Responses API) ----------------------------------------------------
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_openai_agents_sdk_forced_function_tool_round_trip(smol, tok, tmp_path, streamed):
    """An `Agent` with a `@function_tool`, `tool_choice="required"` and `parallel_tool_calls=False`
    on the SDK's default model (`OpenAIResponsesModel`): one call, its arguments JSON valid for the
    function (drawn under its schema), the tool's result goes back, and the run ends with a final
    text output (the SDK resets tool_choice after a tool call), all one recorded conversation.
    Streamed (`Runner.run_streamed`): the Responses events, the call's arguments as a delta."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls: list[tuple[int, int]] = []

    @agents.function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    async def run():
        client = AsyncOpenAI(base_url=smol.url + "/v1", api_key=KEY, max_retries=0)
        agent = agents.Agent(
            name="calculator",
            instructions="Use the add tool to add numbers.",
            tools=[add],
            model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
            model_settings=agents.ModelSettings(
                tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=96
            ),
        )
        try:
            if not streamed:
                return await agents.Runner.run(agent, QUESTION, max_turns=4), set()
            result = agents.Runner.run_streamed(agent, QUESTION, max_turns=4)
            kinds = {e.data.type async for e in result.stream_events() if e.type == "raw_response_event"}
            return result, kinds
        finally:
            await client.close()

    before = _conversations(smol)
    result, kinds = asyncio.run(run())
    new = _conversations(smol) - before
    if streamed:
        assert {"response.created", "response.completed", "response.output_text.delta"} <= kinds
        assert "response.function_call_arguments.delta" in kinds
    assert calls == [(2, 3)], result.new_items
    [call] = [i.raw_item for i in result.new_items if isinstance(i, agents.ToolCallItem)]
    assert call.name == "add" and json.loads(call.arguments) == dict(zip("ab", calls[0]))
    [output] = [i for i in result.new_items if isinstance(i, agents.ToolCallOutputItem)]
    assert output.output == sum(calls[0])
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert len(result.raw_responses) == 2  # the call, then the answer
    # one conversation (the SDK resends the whole history; the server finds its samples)
    assert len(new) == 1
    streams = _exported(smol, new, tmp_path)
    # the instructions, the tools preamble, the question, the call, its output, the answer
    assert _authors(streams) == [["context", "context", "user", "agent", "tool", "agent"]]
    tool_seg = streams[0].segments[4]
    assert tool_seg.meta.get("tool_call_id") == call.call_id and tool_seg.text == str(sum(calls[0]))
    metas = _check_rendered(streams, _requests(smol), tok)
    assert [m["request"]["tool_choice"] for m in metas] == ["required", "auto"]
    assert [m["request"]["stream"] for m in metas] == [streamed, streamed]
    assert metas[0]["tool_calls"][0]["function"]["arguments"] == call.arguments


def test_openai_agents_sdk_structured_output_type(smol, tok, tmp_path):
    """An `Agent` with a pydantic `output_type`: the SDK sends it as `text.format` json_schema; the
    reply is drawn under the schema's grammar and validates."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)

    async def run():
        client = AsyncOpenAI(base_url=smol.url + "/v1", api_key=KEY, max_retries=0)
        agent = agents.Agent(
            name="geographer",
            instructions="Answer with the city and its country.",
            model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
            model_settings=agents.ModelSettings(temperature=0, max_tokens=64),
            output_type=City,
        )
        try:
            return await agents.Runner.run(agent, "What is the capital of France?", max_turns=2)
        finally:
            await client.close()

    before = _conversations(smol)
    result = asyncio.run(run())
    new = _conversations(smol) - before
    assert isinstance(result.final_output, City)
    streams = _exported(smol, new, tmp_path)
    [meta] = _check_rendered(streams, _requests(smol), tok)
    assert meta["request"]["format"]["type"] == "json_schema" and meta["constrained_by"] == "json_schema"
    assert meta["finish_reason"] == "eos"


# -- LangChain (chat completions) ------------------------------------------------------------------
def _chat_openai(smol, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=smol.url + "/v1", api_key=KEY, model=MODEL, temperature=0, max_retries=0, **kw)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_langchain_bind_tools_required_round_trip(smol, tok, tmp_path, streamed):
    """`bind_tools([add], tool_choice="required", parallel_tool_calls=False)`: one call with
    arguments valid for the function (max_tokens 64, the budget that cut the call in the issue) →
    its `ToolMessage` → a final text answer (tools bound, `auto`), one recorded conversation.
    Streamed (`.stream()`, `stream_usage=True`: `stream_options.include_usage`): the chunks add
    up to the same call, and the usage LangChain reports is the recorded exchange's."""
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = _chat_openai(smol, max_tokens=64, stream_usage=True)

    def ask(model, messages):
        if not streamed:
            return model.invoke(messages)
        chunks = list(model.stream(messages))
        return sum(chunks[1:], chunks[0])

    before = _conversations(smol)
    messages = [HumanMessage(QUESTION)]
    ai = ask(llm.bind_tools([add], tool_choice="required", parallel_tool_calls=False), messages)
    assert ai.response_metadata["finish_reason"] == "tool_calls", ai
    assert not ai.invalid_tool_calls and len(ai.tool_calls) == 1, ai
    [call] = ai.tool_calls
    assert call["name"] == "add" and call["args"] == {"a": 2, "b": 3}
    messages += [ai, ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"])]
    final = ask(llm.bind_tools([add]), messages)
    assert final.content and not final.tool_calls, final
    new = _conversations(smol) - before
    assert len(new) == 1
    streams = _exported(smol, new, tmp_path)
    assert _authors(streams)[0] == ["context", "user", "agent", "tool", "agent"]
    assert streams[0].segments[3].meta.get("tool_call_id") == call["id"]
    metas = _check_rendered(streams, _requests(smol), tok)
    assert [m["request"]["tool_choice"] for m in metas] == ["required", "auto"]
    assert [m["request"]["stream"] for m in metas] == [streamed, streamed]
    for reply, meta in zip((ai, final), metas):
        usage = meta["request"]["usage"]
        assert reply.usage_metadata["input_tokens"] == usage["prompt_tokens"]
        assert reply.usage_metadata["output_tokens"] == usage["completion_tokens"]


def test_langchain_with_structured_output_json_schema(smol, tok, tmp_path):
    """`with_structured_output(City, method="json_schema")`: `response_format` json_schema, a
    validated `City` back (parsed by LangChain from the content)."""
    pytest.importorskip("langchain_openai")
    llm = _chat_openai(smol, max_tokens=64)
    before = _conversations(smol)
    out = llm.with_structured_output(City, method="json_schema", include_raw=True).invoke(
        "What is the capital of France?"
    )
    assert out["parsing_error"] is None and isinstance(out["parsed"], City), out
    new = _conversations(smol) - before
    streams = _exported(smol, new, tmp_path)
    [meta] = _check_rendered(streams, _requests(smol), tok)
    assert meta["constrained_by"] == "json_schema"
    assert meta["request"]["response_format"]["name"] == "City"


# -- pydantic-ai (chat completions) ----------------------------------------------------------------
def test_pydantic_ai_function_tool_and_output_type(smol, tok, tmp_path):
    """A pydantic-ai `Agent` with a function tool offered once (`prepare` drops it after its first
    call: left in, greedy SmolLM2-135M calls it again and again) and `output_type=City` (its default
    tool output: a call of `final_result` whose arguments are the object; text is not an output,
    so every request is `tool_choice` required): the function is called, its result goes back, and
    the run ends with a validated `City`. The second request's tools differ from the first's, so it
    continues no recorded sample: a new conversation where the resent call is the client's
    (`teacher`)."""
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent, ModelSettings
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=smol.url + "/v1", api_key=KEY))
    agent = Agent(
        model,
        output_type=City,
        instructions="Find the country of the city with the country_of tool, then give the city and its country.",
        model_settings=ModelSettings(temperature=0, max_tokens=64, parallel_tool_calls=False),
        retries=0,
    )
    looked_up: list[str] = []

    async def once(ctx, tool_def):
        return None if looked_up else tool_def

    @agent.tool_plain(prepare=once)
    def country_of(city: str) -> str:
        """The country a city is in."""
        looked_up.append(city)
        return "France"

    before = _conversations(smol)
    result = agent.run_sync("Paris", usage_limits=UsageLimits(request_limit=4))
    assert looked_up == ["Paris"] and isinstance(result.output, City), result.all_messages()
    new = _conversations(smol) - before
    streams = _exported(smol, new, tmp_path)
    assert sorted(_authors(streams)) == [
        ["context", "context", "user", "agent"],
        ["context", "context", "user", "teacher", "tool", "agent"],
    ]
    metas = _check_rendered(streams, _requests(smol), tok)
    assert [m["request"]["tool_choice"] for m in metas] == ["required", "required"]
    names = sorted(m["tool_calls"][0]["function"]["name"] for m in metas)
    assert names == ["country_of", "final_result"]
    assert all(len(m["tool_calls"]) == 1 for m in metas)  # parallel_tool_calls false


# -- lm-evaluation-harness (completions) -----------------------------------------------------------
def test_lm_eval_local_completions_scores_a_local_task(smol, tok, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` (its loglikelihood requests: token ids, `echo`,
    `logprobs: 1`, `max_tokens: 1`) scores `lm_eval_task/dostream_capitals.yaml` (six
    multiple-choice items in a JSONL file) with the local tokenizer, no network. Each scored
    prompt is recorded as its own conversation: `[context: the prompt ids' text, agent: one
    token]`, rendered plain to the very ids lm-eval sent."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(tok_dir)  # the embedded model's tokenizer, for lm-eval's context lengths
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions' bearer token
    monkeypatch.chdir(TASK_DIR)  # the task's data_files is relative to the working directory
    before = _conversations(smol)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": smol.url + "/v1/completions",
            "model": MODEL,
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tok_dir),
            "max_retries": 1,
        },
        tasks=["dostream_capitals"],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
    )
    result = out["results"]["dostream_capitals"]
    assert result["sample_len"] == 6
    # an easy task: the model's log-likelihoods pick the capital far above chance (1/3)
    assert result["acc,none"] >= 0.5, result
    lls = [ll for s in out["samples"]["dostream_capitals"] for ll, _greedy in s["filtered_resps"]]
    assert len(lls) == 18 and all(ll < 0 for ll in lls)
    new = _conversations(smol) - before
    assert len(new) == 18  # one request per context + choice, max_tokens 1: each a conversation
    streams = _exported(smol, new, tmp_path)
    assert all(a == ["context", "agent"] for a in _authors(streams))
    metas = _check_rendered(streams, _requests(smol), tok, chat=False)
    assert all(m["request"]["echo"] and m["request"]["logprobs"] == 1 for m in metas)
