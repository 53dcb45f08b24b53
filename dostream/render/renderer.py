"""`Renderer`, the front door: a stream's pieces (plain, or from the chat paths) into token ids with
their authors and offsets, sampled ids kept exact; knows nothing of views, labels or rows."""

from __future__ import annotations

from typing import Any

from dostream.render.chat import chat_pieces
from dostream.render.pieces import _messages, _Piece
from dostream.render.rendered import Rendered, RenderError
from dostream.stream import Stream


def decode(tokenizer, ids: list[int]) -> str:
    """The one decoding rule for sampled ids: nothing skipped, nothing cleaned up. The sampler
    writes agent text with it and the renderer checks agent text against it."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class Renderer:
    """Turns streams into `Rendered` token sequences for one tokenizer.

    `chat_template=True` uses the tokenizer's own chat template (segments are grouped into
    messages by role: a segment's `role`, else `AUTHOR_ROLES[author]`; consecutive segments with
    the same role share one message). `add_eos` closes plain renderings with the EOS token.
    """

    def __init__(self, tokenizer, *, chat_template: bool = False, add_eos: bool = True):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise RenderError(f"{type(tokenizer).__name__} has no chat template: render in plain mode")
        self.tok = tokenizer
        self.chat_template = chat_template
        self.add_eos = add_eos
        self._special = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)

    # -- public -----------------------------------------------------------------------------
    def render(self, stream: Stream, *, add_generation_prompt: bool = False) -> Rendered:
        """Render one stream. `add_generation_prompt` (chat mode) appends the template's opening of
        an assistant turn, authored `protocol`, ready for sampling."""
        try:
            if self.chat_template:
                pieces = chat_pieces(self, stream, add_generation_prompt)
            else:
                turns = [k for k, m in enumerate(_messages(stream)) for _ in m["segments"]]
                pieces = [
                    _Piece(s.author, s.text, s.token_ids, f"segment {i}", turns[i])
                    for i, s in enumerate(stream.segments)
                ]
                if self.add_eos and not add_generation_prompt:
                    pieces.append(self._eos_piece(pieces))
            return self._tokenize(stream.id, pieces)
        except RenderError as e:
            if stream.source is None:
                raise
            raise RenderError(f"{stream.source}: {e}") from None

    def prompt_ids(self, stream: Stream) -> list[int]:
        """Ids to condition sampling on: the stream so far, open for the agent's next turn."""
        return self.render(stream, add_generation_prompt=True).input_ids

    # -- plain ------------------------------------------------------------------------------
    def _eos_piece(self, pieces: list[_Piece]) -> _Piece:
        eos_id = self.tok.eos_token_id
        if eos_id is None:
            raise RenderError("the tokenizer has no EOS token: pass add_eos=False")
        last = pieces[-1]
        if last.token_ids and last.token_ids[-1] == eos_id:
            return _Piece(last.author, "", [], "eos", last.turn)  # the agent already sampled its own EOS
        return _Piece(last.author, self.tok.eos_token, [eos_id], "eos", last.turn)

    # -- tokenisation -----------------------------------------------------------------------
    def _tokenize(self, sid: str, pieces: list[_Piece]) -> Rendered:
        text_parts: list[str] = []
        ids: list[int] = []
        authors: list[str] = []
        offsets: list[tuple[int, int] | None] = []
        segments: list[dict[str, Any]] = []
        turn_starts: list[int] = []
        head, in_head, turn = 0, True, None
        pos = 0
        for p in pieces:
            if p.token_ids is not None:
                p_offsets = self._sampled_offsets(sid, p)
                p_ids = list(p.token_ids)
            elif p.text:
                enc = self.tok(p.text, add_special_tokens=False, return_offsets_mapping=True)
                p_ids = enc["input_ids"]
                p_offsets = _tile(enc["offset_mapping"])
            else:
                continue
            if turn is not None and p.turn != turn:
                turn_starts.append(len(ids))
            turn = p.turn
            in_head = in_head and p.author == "context"
            head += len(p_ids) if in_head else 0
            ids += p_ids
            authors += [p.author] * len(p_ids)
            offsets += [None if o is None else (o[0] + pos, o[1] + pos) for o in p_offsets]
            if p.text:
                segments.append({"author": p.author, "start": pos, "end": pos + len(p.text)})
            text_parts.append(p.text)
            pos += len(p.text)
        return Rendered(sid, "".join(text_parts), ids, authors, offsets, segments, turn_starts, head)

    def _sampled_offsets(self, sid: str, p: _Piece) -> list[tuple[int, int] | None]:
        """Character spans of sampled ids inside their own text, by incremental decoding.

        A token that decodes to part of a character (byte-level BPE splits emoji) gets `None`;
        the token that completes the character gets its span. Decoding restarts after every
        complete character, so the cost is linear in the segment length."""
        ids, text = p.token_ids, p.text
        vocab = len(self.tok)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise RenderError(
                f"stream {sid!r}, {p.where} (agent): token id {bad} is not in the tokenizer's vocabulary "
                f"(ids 0..{vocab - 1}): were these ids sampled with another tokenizer?"
            )
        full = decode(self.tok, ids)
        if full != text:
            raise RenderError(
                f"stream {sid!r}, {p.where} (agent): token_ids decode to {full[:60]!r} but text is "
                f"{text[:60]!r}; sampled ids and text must agree"
            )
        offsets: list[tuple[int, int] | None] = []
        anchor_tok = anchor_char = 0
        for i in range(len(ids)):
            piece = decode(self.tok, ids[anchor_tok : i + 1])
            if not text.startswith(piece, anchor_char):
                if piece.endswith("\ufffd"):
                    offsets.append(None)  # an incomplete UTF-8 sequence so far
                    continue
                return self._sampled_offsets_slow(ids, text)  # a decoder that is not concatenative
            end = anchor_char + len(piece)
            offsets.append((anchor_char, end) if end > anchor_char else None)
            anchor_tok, anchor_char = i + 1, end
        return offsets

    def _sampled_offsets_slow(self, ids: list[int], text: str) -> list[tuple[int, int] | None]:
        """Whole-prefix decoding, for tokenizers whose decode of a suffix differs from the
        suffix of the decode (SentencePiece drops a leading space)."""
        offsets: list[tuple[int, int] | None] = []
        done = 0
        for i in range(len(ids)):
            prefix = decode(self.tok, ids[: i + 1])
            end = len(prefix) if text.startswith(prefix) else done
            offsets.append((done, end) if end > done else None)
            done = max(done, end)
        return offsets


def _tile(spans: list[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """Fast tokenizers give the byte-level pieces of one character (an emoji split in three
    tokens) overlapping spans. Make the spans tile the text: each token keeps only the characters
    no earlier token claimed, and a token left with none gets `None`."""
    out: list[tuple[int, int] | None] = []
    done = 0
    for s, e in spans:
        out.append((max(s, done), e) if e > done else None)
        done = max(done, e)
    return out
