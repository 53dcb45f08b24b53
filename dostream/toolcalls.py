"""Tool calls and reasoning as text: the one convention dostream writes, renders and parses.

A tool call is an action of the assistant turn that makes it, so its tokens carry that turn's
author (an `agent` call is masked under `interventional`, a `teacher` call is supervised) and a
call is never dropped. Two renderings exist:

* The tokenizer's own chat template, when it supports tools (`template_supports_tools`): the
  renderer passes `tools=` and each message's `tool_calls` to the template, which writes its own
  syntax.
* Otherwise (plain rendering, or a template without tools, such as the embedded SmolLM2 one) the
  documented **text form**, the Hermes / Qwen2.5 convention, which is also what the segments of an
  imported stream hold as their text:

  - the tool list is a preamble in the system prompt (`tools_preamble`), one JSON object per tool
    inside `<tools></tools>`;
  - each call is a block in the assistant turn (`format_calls`), after the turn's text if any:

        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Paris"}}
        </tool_call>

  - a tool's answer is a message in the `tool` role, its content as written.

`parse_calls` reads the model's output back into (content, OpenAI `tool_calls` with JSON-string
`arguments`), for the OpenAI-compatible server. The three functions round-trip:
`parse_calls(format_calls(calls))[1]` has the same names and arguments as `calls`.

>>> text = format_calls([{"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}])
>>> print(text)
<tool_call>
{"name": "add", "arguments": {"a": 1, "b": 2}}
</tool_call>
>>> parse_calls("Let me add.\\n" + text)
('Let me add.', [{'id': 'call_0', 'type': 'function', 'function': {'name': 'add', 'arguments': '{"a": 1, "b": 2}'}}])
"""

from __future__ import annotations

import json
import re
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

# The Hermes / Qwen2.5 tool preamble: the wording models trained on that convention have seen.
_PREAMBLE_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_PREAMBLE_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def _dumps(obj: Any) -> str:
    # ensure_ascii=False and the default separators: what the HF templates' `tojson` writes, so the
    # text form equals a Hermes/Qwen template's rendering character for character.
    return json.dumps(obj, ensure_ascii=False)


def call_parts(call: dict) -> tuple[str, Any]:
    """(name, arguments) of one call in any of the shapes logs use: OpenAI `tool_calls` items
    (`{"function": {"name", "arguments"}}`), the legacy `function_call` / ShareGPT object
    (`{"name", "arguments"}`), `parameters` for `arguments`. `arguments` comes back decoded when it
    is a JSON string holding an object, else as given (a call is kept, never dropped, even when its
    arguments are not JSON); missing arguments are `{}`. Raises `ValueError` without a name."""
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be an object, got {type(call).__name__}")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a function name")
    args = fn.get("arguments", fn.get("parameters"))
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            decoded = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict):
            args = decoded
    return name, args


def normalize_call(call: dict, index: int = 0) -> dict:
    """One call in the OpenAI shape, `arguments` a JSON string: `{"id", "type": "function",
    "function": {"name", "arguments"}}` (the id is kept, else `call_<index>`)."""
    name, args = call_parts(call)
    cid = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"call_{index}"
    return {
        "id": cid,
        "type": "function",
        "function": {"name": name, "arguments": args if isinstance(args, str) else _dumps(args)},
    }


def format_calls(calls: list[dict]) -> str:
    """OpenAI `tool_calls` (or legacy `function_call` objects) → the text form: one
    `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` block per call, joined by a
    newline. A turn with text puts a newline between its text and the first block."""
    blocks = []
    for call in calls:
        name, args = call_parts(call)
        blocks.append(f'{CALL_OPEN}\n{{"name": {_dumps(name)}, "arguments": {_dumps(args)}}}\n{CALL_CLOSE}')
    return "\n".join(blocks)


def _decode_call(body: str) -> tuple[str, Any] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return obj["name"], obj.get("arguments", obj.get("parameters", {}))


def parse_calls(text: str, *, id_prefix: str = "call_") -> tuple[str, list[dict]]:
    """Model output → (content, OpenAI-shaped `tool_calls`, `arguments` as JSON strings).

    Every `<tool_call>` block holding a JSON object with a `name` becomes a call (ids
    `<id_prefix>0`, `1`, ... in order) and is removed from the content; a block that is not valid
    JSON stays in the content, so nothing the model wrote is lost. A last block left open (the
    model stopped at `</tool_call>` or ran out of tokens) counts when its JSON is complete. The
    content is stripped of surrounding whitespace ("" when the turn is only calls)."""
    calls: list[dict] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        decoded = _decode_call(m.group(1))
        if decoded is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(decoded)
    rest = text[pos:]
    open_at = rest.rfind(CALL_OPEN)  # a last block cut at the stop string `</tool_call>`
    if open_at >= 0 and CALL_CLOSE not in rest[open_at:]:
        decoded = _decode_call(rest[open_at + len(CALL_OPEN) :].strip())
        if decoded is not None:
            rest = rest[:open_at]
            calls.append(decoded)
    kept.append(rest)
    content = "".join(kept).strip()
    out = [
        {
            "id": f"{id_prefix}{i}",
            "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else _dumps(args)},
        }
        for i, (name, args) in enumerate(calls)
    ]
    return content, out


def normalize_tool(tool: dict) -> dict:
    """A tool definition in the OpenAI shape `{"type": "function", "function": {"name", ...}}`
    (a bare `{"name", "description", "parameters"}` is wrapped). Raises `ValueError` without a name."""
    if not isinstance(tool, dict):
        raise ValueError(f"a tool definition must be an object, got {type(tool).__name__}")
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    if not isinstance(fn.get("name"), str) or not fn.get("name"):
        raise ValueError("a tool definition needs a function name")
    if fn is tool:
        return {"type": "function", "function": dict(tool)}
    return {**tool, "type": tool.get("type", "function")}


def tools_preamble(tools: list[dict]) -> str:
    """The tool list as text for the system prompt (Hermes / Qwen2.5 wording): one JSON object per
    tool inside `<tools></tools>`, then how to write a call."""
    lines = "".join("\n" + _dumps(normalize_tool(t)) for t in tools)
    return _PREAMBLE_HEAD + lines + _PREAMBLE_TAIL


# Reasoning ("thinking") is kept as a segment of its own before the turn's text and calls
# (`meta.reasoning: true`, the turn's role and author). Its text is this default form, Qwen3's /
# DeepSeek-R1's: `<think>\n{reasoning}\n</think>\n\n`. A chat template that writes reasoning itself
# (`template_reasoning_markers`) has its own markers put around it instead when rendering.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_OPEN, REASONING_CLOSE = THINK_OPEN + "\n", "\n" + THINK_CLOSE + "\n\n"


def format_reasoning(reasoning: str) -> str:
    """A turn's reasoning in the default text form (surrounding newlines of the body dropped, as
    Qwen3's template drops them).

    >>> format_reasoning("\\n2 + 2 is 4.\\n")
    '<think>\\n2 + 2 is 4.\\n</think>\\n\\n'
    """
    return REASONING_OPEN + reasoning.strip("\n") + REASONING_CLOSE


def reasoning_body(text: str) -> str | None:
    """The reasoning inside a text in the default form (`format_reasoning`), else None."""
    if (
        text.startswith(REASONING_OPEN)
        and text.endswith(REASONING_CLOSE)
        and len(text) >= len(REASONING_OPEN + REASONING_CLOSE)
    ):
        return text[len(REASONING_OPEN) : len(text) - len(REASONING_CLOSE)]
    return None


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A leading `<think>...</think>` block of a turn's text → (its reasoning, the rest), else
    (None, text). Only a block that opens the text (after whitespace) counts: a `<think>` later in
    the text is the turn's text. The reasoning loses its surrounding newlines and the rest its
    leading whitespace, so `format_reasoning(r) + rest` is the usual spelling of the turn.

    >>> split_reasoning("<think>\\nSmall numbers.\\n</think>\\n\\n4")
    ('Small numbers.', '4')
    """
    head = text.lstrip()
    if not head.startswith(THINK_OPEN):
        return None, text
    end = head.find(THINK_CLOSE)
    if end < 0:
        return None, text
    return head[len(THINK_OPEN) : end].strip("\n"), head[end + len(THINK_CLOSE) :].lstrip()


_PROBE_FN, _PROBE_TOOL = "dostream_probe_call", "dostream_probe_tool"
_SUPPORT_CACHE: dict[str, bool] = {}


def template_supports_tools(tokenizer) -> bool:
    """Does the tokenizer's chat template write tool calls and the tool list itself?

    Renders a probe conversation with `tools=` and an assistant `tool_calls` entry and checks that
    both function names appear in the output (templates that ignore them, like SmolLM2's, or
    that fail on them, do not support tools: dostream then uses the text form). Cached per template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return False
    if template not in _SUPPORT_CACHE:
        messages = [
            {"role": "user", "content": "probe"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": _PROBE_FN, "arguments": {"x": 1}}}],
            },
        ]
        tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "", "parameters": {}}}]
        try:
            out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # any template error (raise_exception, a missing field) means: not supported
            out = ""
        _SUPPORT_CACHE[template] = isinstance(out, str) and _PROBE_FN in out and _PROBE_TOOL in out
    return _SUPPORT_CACHE[template]


_MARKERS_CACHE: dict[str, tuple[str, str] | None] = {}
_PROBE_R, _PROBE_C = "\u2063DOSTREAM_REASONING\u2063", "\u2063DOSTREAM_CONTENT\u2063"


def template_reasoning_markers(tokenizer) -> tuple[str, str] | None:
    """The text a chat template writes before and after an assistant turn's reasoning, or None
    when it writes none (SmolLM2's): then the default form (`format_reasoning`) is used.

    Renders a probe conversation whose last assistant turn carries `reasoning_content` (also as
    `reasoning` and `thinking`, the other names templates read), and reads what surrounds it:
    before it, what the template adds to the turn without reasoning; after it, up to the turn's
    content (Qwen3's template gives `("<think>\\n", "\\n</think>\\n\\n")`). Cached per template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return None
    if template not in _MARKERS_CACHE:
        user = {"role": "user", "content": "probe"}
        plain = {"role": "assistant", "content": _PROBE_C}
        thinking = {**plain, "reasoning_content": _PROBE_R, "reasoning": _PROBE_R, "thinking": _PROBE_R}
        markers = None
        try:
            with_r = tokenizer.apply_chat_template([user, thinking], tokenize=False)
            without = tokenizer.apply_chat_template([user, plain], tokenize=False)
        except Exception:  # a template that fails on the probe writes no reasoning we can use
            with_r = without = ""
        r, c = with_r.find(_PROBE_R), with_r.find(_PROBE_C)
        if 0 <= r < c and with_r.count(_PROBE_R) == 1:
            p = 0
            while p < min(r, len(without)) and with_r[p] == without[p]:
                p += 1
            markers = (with_r[p:r], with_r[r + len(_PROBE_R) : c])
        _MARKERS_CACHE[template] = markers
    return _MARKERS_CACHE[template]
