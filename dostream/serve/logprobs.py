"""OpenAI's `logprobs` of a choice, from a `Sample`'s: one entry per sampled token. Knows no HTTP.

An entry is `{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`.
`token` is the token's text by the one decoding rule (`render.decode` of that id alone: a token
that is part of a UTF-8 character decodes with replacement characters, as vLLM and OpenAI show it);
`bytes` are the token's own bytes (byte-level BPE: its bytes, not its text's), so the bytes of a
choice's entries join to the UTF-8 of what it sampled. The log-probs are the sampler's
(`Sample.logprobs`): the model's raw distribution, before temperature and top-p.

As vLLM does, a choice has an entry for every token it sampled, the end-of-turn token and the
tokens of a stop string included, though the content leaves them out: the entries' tokens join
to the content followed by what was cut from it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from dostream.render import decode
from dostream.sampling import Sample

_FLOOR = -9999.0  # OpenAI's log-prob of a token with no mass (JSON has no -inf)
_HEX = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # a SentencePiece byte-fallback token


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE writes for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tok, token: int, text: str | None = None) -> bytes:
    """A token's own bytes: its text's where it decodes whole, else its byte-level piece's."""
    text = decode(tok, [token]) if text is None else text
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tok.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        if m := _HEX.match(piece):
            return bytes([int(m.group(1), 16)])
        table = _byte_of()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return text.encode("utf-8")


def _one(tok, token: int, logprob: float) -> dict[str, Any]:
    text = decode(tok, [token])
    return {"token": text, "logprob": max(float(logprob), _FLOOR), "bytes": list(token_bytes(tok, token, text))}


def entry(tok, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
    """The entry of one sampled token (`top`: its step's most likely (id, logprob), most likely first)."""
    return {**_one(tok, token, logprob), "top_logprobs": [_one(tok, i, v) for i, v in top]}


def choice_logprobs(tok, sample: Sample) -> dict[str, Any] | None:
    """A choice's `logprobs` (`{"content": [entry, ...]}`), None where the sample has none."""
    if sample.logprobs is None:
        return None
    tops = sample.top_logprobs or [[] for _ in sample.token_ids]
    return {"content": [entry(tok, t, lp, top) for t, lp, top in zip(sample.token_ids, sample.logprobs, tops)]}
