"""Grammars a row's output must follow (structured outputs): a JSON schema, or any JSON object,
compiled for a tokenizer by llguidance; knows nothing of the decode loop beyond masking logits.

`json_grammar(tokenizer, schema)` compiles once per tokenizer and schema (cached); `Grammar.matcher()`
is one row's state, and `GrammarMasks` writes the rows' masks into their logits in one pass.
llguidance was chosen by measurement (benchmarks/grammar_mask.py, docs/results/grammar_mask.json;
SmolLM2's 49152 tokens, 32 rows, 2-core AVX2): a step (32 masks, applied to the logits, 32 tokens
accepted) takes ~5.4 ms with llguidance, ~3.5 ms with xgrammar and ~6.4 ms with outlines-core,
against ~115 ms a decode step; most of it is applying the masks (~3 ms, the same code for all).
xgrammar is faster by ~1.9 ms (1.6% of a step) but compiles schemas with keywords it does not
implement (`$dynamicRef`, `contains`, an unknown `format`) without a word, so a reply would not
be held to them; llguidance names them ("Unimplemented keys"), which the server turns into a 400,
and it has no dependencies of its own (xgrammar requires torch, transformers and triton, a 286 MB
wheel on every CPU install). Output is compact JSON (`, ` and `: ` separators, no other
whitespace): a model can not pad a reply with endless newlines.

`tool_grammar` is the grammar of a turn under tools (`toolcalls.py`'s one convention,
`<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`, blocks joined by a newline), as a
Lark grammar with each function's arguments an embedded JSON schema: a call is required (OpenAI's
`tool_choice` `required` or a named function: the turn is one call, or several with
`parallel_tool_calls`), or free (`auto` with a `strict` tool or `parallel_tool_calls: false`): any
text without the opening, or text then the call(s); or, with a reply schema, that JSON or the call(s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from dostream.toolcalls import CALL_OPEN, format_calls

# Any JSON object (OpenAI's `json_object`).
JSON_OBJECT: dict[str, Any] = {"type": "object"}
_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema llguidance cannot compile (invalid, or a keyword it does not implement);
    `function`: the tool whose arguments schema it is, if any."""

    def __init__(self, message: str, function: str | None = None):
        super().__init__(message)
        self.function = function


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one tokenizer: `kind` ("json_schema" or "json_object") is what the
    recorded sample says it was drawn under."""

    kind: str
    text: str  # llguidance's grammar
    tokenizer: Any  # llguidance.LLTokenizer
    vocab: int

    def matcher(self):
        """A fresh state: one per row."""
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, self.text)


@lru_cache(maxsize=8)
def _lltokenizer(tokenizer):
    import llguidance

    return llguidance.LLTokenizer(
        tokenizer.backend_tokenizer.to_str(), n_vocab=len(tokenizer), eos_token=tokenizer.eos_token_id
    )


def json_grammar(tokenizer, schema: dict | None) -> Grammar:
    """The grammar of JSON valid against `schema` (None: any JSON object) for `tokenizer`.
    Raises `GrammarError` naming what is wrong with the schema."""
    return _compiled(
        tokenizer, json.dumps(schema if schema is not None else JSON_OBJECT, sort_keys=True), schema is None
    )


@lru_cache(maxsize=64)
def _compiled(tokenizer, schema: str, any_object: bool) -> Grammar:
    import llguidance

    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_OPTIONS)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return Grammar(
        "json_object" if any_object else "json_schema", _checked(text), _lltokenizer(tokenizer), len(tokenizer)
    )


def _checked(text: str) -> str:
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise GrammarError("; ".join(messages))
    return text


def tool_grammar(
    tokenizer,
    tools: list[tuple[str, dict | None]],
    *,
    required: bool,
    parallel: bool,
    reply: dict | None | bool = False,
) -> Grammar:
    """The grammar of a turn under `tools` ((name, arguments schema) pairs; None: any JSON object).
    `required`: the turn is a call (several, joined by newlines, with `parallel`); else it is
    either free text that never opens a call or (`reply` False) text then the call(s), or (`reply`
    a schema, None for any object) that JSON or the call(s). Raises `GrammarError` naming the
    function whose schema llguidance cannot compile."""
    key = json.dumps([tools, required, parallel, reply], sort_keys=True)
    return _tool_compiled(tokenizer, key)


@lru_cache(maxsize=64)
def _tool_compiled(tokenizer, key: str) -> Grammar:
    import llguidance

    tools, required, parallel, reply = json.loads(key)
    text = format_calls([{"name": "NAME", "arguments": {}}])
    head, tail = text[len(CALL_OPEN) : text.index('"NAME"')], text[text.rindex("{}") + 2 :]
    middle = text[text.index('"NAME"') + len('"NAME"') : text.rindex("{}")]
    bodies = []
    for name, schema in tools:
        schema = {**(schema or JSON_OBJECT), "x-guidance": _OPTIONS}
        try:  # each function's schema alone first: the error names it
            _checked(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
        except (ValueError, GrammarError) as e:
            raise GrammarError(f"function {name!r}: {e}", function=name) from None
        opening = json.dumps(head + json.dumps(name) + middle)
        bodies.append(f"{opening} %json {json.dumps(schema)} {json.dumps(tail)}")
    rules = [f"body: {' | '.join(f'b{i}' for i in range(len(bodies)))}"]
    rules += [f"b{i}: {b}" for i, b in enumerate(bodies)]
    more = f" ({json.dumps(chr(10) + CALL_OPEN)} body)*" if parallel else ""
    if required:
        start, kind = f"{json.dumps(CALL_OPEN)} body{more}", "tool_calls"
    elif reply is False:
        start, kind = f"TEXT | opening body{more}", "text_or_tool_calls"
        rules += [
            f"opening[lazy]: /(.|\\n)*/ {json.dumps(CALL_OPEN)}",
            f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{CALL_OPEN}(.|\\n)*/",
        ]
    else:
        schema = {**(reply or JSON_OBJECT), "x-guidance": _OPTIONS}
        start = f"%json {json.dumps(schema)} | {json.dumps(CALL_OPEN)} body{more}"
        kind = ("json_object" if reply is None else "json_schema") + "_or_tool_calls"
    lark = "\n".join(["%llguidance {}", f"start: {start}", *rules])
    try:
        grammar = _checked(llguidance.LLMatcher.grammar_from_lark(lark))
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return Grammar(kind, grammar, _lltokenizer(tokenizer), len(tokenizer))


class GrammarMasks:
    """Writes the masks of the rows that have a grammar into their logits (-inf outside what
    their grammar allows next; a complete grammar allows the row's end-of-turn ids only)."""

    def __init__(self, vocab: int, eos: int | None):
        import llguidance

        self.vocab, self.words, self.eos = vocab, (vocab + 31) // 32, ([] if eos is None else [eos])
        self.executor = llguidance.LLExecutor()
        self.bits = np.zeros((0, self.words), dtype=np.int32)

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list, eos: list[set[int]]) -> None:
        if len(self.bits) < len(rows):
            self.bits = np.zeros((2 * len(rows), self.words), dtype=np.int32)
        bits = self.bits[: len(rows)]
        self.executor.unsafe_compute_mask_ptr(
            [(m, r) for r, m in enumerate(matchers)], bits.ctypes.data, self.words * 4, len(rows)
        )
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
        if allowed.shape[1] < logits.shape[1]:  # the model's padded vocabulary: never a token
            allowed = np.pad(allowed, ((0, 0), (0, logits.shape[1] - allowed.shape[1])))
        for r, m in enumerate(matchers):
            # Complete (or, defensively, in error: nothing allowed): its end is the row's own
            # end-of-turn ids, not llguidance's EOS.
            if m.is_accepting() or m.is_error():
                allowed[r, self.eos] = 0
                allowed[r, list(eos[r])] = 1
        sel = torch.tensor(rows, device=logits.device)
        logits[sel] = logits[sel].masked_fill_(torch.from_numpy(allowed).to(logits.device) == 0, float("-inf"))
