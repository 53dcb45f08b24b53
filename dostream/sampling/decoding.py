"""`Decode`, the one decode loop that rows join and leave: knows nothing of how callers batch
prompts, of vLLM, or of a cache's storage layout.

The decode loop is our own, `Decode`: rows join a running decode between steps and leave as they
end (continuous batching: the server adds the requests that arrived meanwhile; `sample` adds a
batch and steps it to the end). A step is one forward, then one token per row: the forward takes
the running rows' last tokens and the joining rows' prompts together (a join costs no forward of
its own; a forward's cost on a CPU is mostly reading the weights), and a row that ends leaves
before any further forward. Prompts are prefilled in buckets of similar length (little
padding compute), identical prompts once; the rows share one left-padded batch with attention mask
and position ids, in a transformers `DynamicCache` whose layers write into reserved storage
instead of concatenating; last-position logits only; an ended row's slot is filled by moving the
last row into it. Each row has its own settings (temperature, top-p, stop strings, budget), an
optional per-token hook (streaming) and an optional grammar it must follow throughout (structured
outputs and tool calls, `sampling.grammar`: `Sample.grammar` names it; the model chooses among what
it allows) and an optional LoRA adapter of its own (`sampling.adapters.Lora`: rows of many adapters
share the base model's products in one forward, each adding its own adapter's delta; its prefill
and prefix-cache entries are keyed by the adapter's key with its ids, never shared across adapters).
Llama-family models (Llama, Mistral, Qwen2) prefill and decode with `cached_forward.CachedForward`
(for SmolLM2-135M at batch 32 on 2 CPU cores, ~29 ms per decode step in bf16 against ~42 ms
through the model's forward); other models call their forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dostream.cached_forward import CachedForward
from dostream.render import decode
from dostream.sampling.config import FinishReason, Sample, SamplingConfig, default_eos
from dostream.sampling.grammar import Grammar, GrammarMasks
from dostream.sampling.pick import _pick, _row_generator
from dostream.sampling.prefill import _forward, _prefill, _prefill_inputs
from dostream.sampling.prefix import PrefixCache, _key

_RESERVE_FIRST = 256  # new tokens the KV cache has room for before it first doubles


@dataclass
class _Row:
    """One row of a running decode: its settings, its random stream, what it drew so far."""

    tag: Any
    config: SamplingConfig
    eos: set[int]
    prompt_len: int
    uniforms: list[float] | None  # its generator's draws, one per step (None: greedy)
    hook: Callable[..., None] | None
    ids: list[int] = field(default_factory=list)
    reason: FinishReason | None = None  # set when it ends
    cancelled: bool = False  # ends at the next step (`Decode.cancel`)
    logprobs: list[float] | None = None  # per drawn token, with `config.logprobs` set (`Sample.logprobs`)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    grammar: Grammar | None = None  # every token is drawn under its mask (`matcher`: the row's state)
    matcher: Any = None
    lora: Any = None  # its adapter (`sampling.adapters.Lora`), None: the base model's rows

    def sample(self, tokenizer) -> Sample:
        """What the row drew, as a `Sample`."""
        return Sample(
            self.ids,
            decode(tokenizer, self.ids),
            self.reason,
            self.prompt_len,
            self.logprobs,
            self.top_logprobs,
            None if self.grammar is None else self.grammar.kind,
        )


class Decode:
    """A decode in progress that rows join between steps (`add`) and leave as they end (`step`).

    This is the sampler's one decode loop. `sample` adds a batch and steps it to the end; the
    server adds the requests that arrived meanwhile before every step (continuous batching), so
    none waits for the longest row of a batch it was not in. A row is its prompt, its random stream
    `(seed, j)`, its own `SamplingConfig` (temperature, top-p, stop strings, budget), an optional
    `hook(token)` called as each of its tokens is drawn (streaming), and an optional grammar its
    output follows (the model still chooses among what it allows). Row r's t-th token uses the t-th uniform of its own generator, whatever shares
    the batch and whenever it joined, so it draws what it would alone, up to float rounding.
    A row whose config sets `logprobs` also gets, from the logits that drew each token, its raw
    log-prob and top alternatives (`_Row.logprobs`, `_Row.top_logprobs`), and its hook is called
    `hook(token, (logprob, top))`; other rows pay nothing for it.
    Models whose cache is not the reserved one (sliding windows, ...) decode a batch but take no
    rows into it once it runs (`joinable`). `prefix_cache`: a `PrefixCache` made for `model`, kept
    between decodes by a caller whose prompts share leading tokens (the server): joining rows
    prefill only what follows their longest cached prefix.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        forward: CachedForward | None = None,
        eos: set[int] | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        if prefix_cache is not None and prefix_cache.model is not model:
            raise ValueError("this prefix cache was made for another model: its keys and values are not this model's")
        self.model, self.tok, self.forward, self.prefix_cache = model, tokenizer, forward, prefix_cache
        self.eos = set(eos) if eos is not None else default_eos(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []
        self.joining: list[tuple[_Row, list[int]]] = []  # added, prefilled by the next step
        self.cache = None
        self.joinable = True
        self.mask = self.position = self.logits = None
        self._tokens: torch.Tensor | None = None  # each row's last token, drawn, not yet forwarded
        self._scratch: torch.Tensor | None = None
        self._masks: GrammarMasks | None = None  # made when a row with a grammar first joins
        self._ahead: list[tuple[list, Callable[[int], None]]] = []  # prefills ahead for the next step (`ahead`)

    @property
    def active(self) -> int:
        """Rows decoding or joining."""
        return len(self.rows) + len(self.joining)

    def add(
        self,
        prompts: list[list[int]],
        seeds: list[tuple[int, int]],
        configs: list[SamplingConfig],
        tags: list[Any],
        hooks: list[Callable[[int], None] | None] | None = None,
        grammars: list[Grammar | None] | None = None,
        adapters: list | None = None,
    ) -> None:
        """Rows join: the next `step` prefills their prompts (identical prompts once, similar
        lengths together) in the same forward as the running rows' next tokens. `grammars`: a
        row's output must follow its grammar (`sampling.grammar`) to its end. `adapters`: a row's
        LoRA adapter (`sampling.adapters.Lora`) added to the model for it alone, None for the model
        as it is; they need the sampler's own forward (`CachedForward`)."""
        if self.rows and not self.joinable:
            raise RuntimeError("this model's cache takes no rows into a running decode")
        if adapters and any(a is not None for a in adapters) and self.forward is None:
            raise ValueError("per-row adapters need the sampler's own forward (CachedForward: Llama-family models)")
        for i, (p, c) in enumerate(zip(prompts, configs)):
            draws = (
                None
                if c.is_greedy
                else torch.rand(c.max_new_tokens, generator=_row_generator(*seeds[i]), dtype=torch.float64)
            )
            row = _Row(
                tag=tags[i],
                config=c,
                eos=set(c.eos_token_ids) if c.eos_token_ids is not None else self.eos,
                prompt_len=len(p),
                uniforms=None if draws is None else draws.tolist(),
                hook=hooks[i] if hooks else None,
                lora=adapters[i] if adapters else None,
            )
            if c.logprobs is not None:
                row.logprobs, row.top_logprobs = [], []
            if grammars and grammars[i] is not None:
                row.grammar, row.matcher = grammars[i], grammars[i].matcher()
                self._masks = self._masks or GrammarMasks(grammars[i].vocab, self.tok.eos_token_id)
            self.joining.append((row, list(p)))

    @torch.inference_mode()
    def step(self) -> list[_Row]:
        """One forward, then one token for every row: the forward takes the running rows' last
        tokens and the joining rows' prompts together (`_forward`: with `CachedForward`, one product
        per linear layer for all of them, so a join costs no forward of its own); rows that end
        leave at once, before any further forward. Returns the rows that ended (`tag`, `ids`,
        `reason`, `prompt_len`)."""
        joining, self.joining = self.joining, []
        running = None
        if self.rows:  # their last drawn tokens, into the cache
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            self.position = self.position + 1
            running = (self._tokens[:, None], self.position, self.mask, self.cache)
            if any(row.lora is not None for row in self.rows):
                running = (*running, [row.lora for row in self.rows])
        warm = self._take_ahead() if running is not None else None  # prefills ahead, in this step's forward
        extra = [] if warm is None else [part for *_, part in warm[2]]
        if joining:
            self._join(joining, running, extra)
        elif running is not None:
            [self.logits, *_] = _forward(self.model, self.forward, [running, *extra])
        if warm is not None:
            self._settle(warm)
        if not self.rows:
            return []
        tokens, scored = self._choose()
        ended, keep = [], []
        for j, (row, tok) in enumerate(zip(self.rows, tokens.tolist())):
            row.ids.append(tok)
            entry = scored.get(j)
            if entry is not None:
                row.logprobs.append(entry[0])
                row.top_logprobs.append(entry[1])
            if row.hook is not None:
                row.hook(tok) if entry is None else row.hook(tok, entry)
            if row.matcher is not None and tok not in row.eos:
                row.matcher.consume_token(tok)
            row.reason = self._finished(row, tok)
            if row.reason is None:
                keep.append(j)
            else:
                ended.append(row)
        if not keep:
            self.rows, self.cache, self._tokens = [], None, None
            return ended
        if len(keep) < len(self.rows):
            tokens = self._drop(keep, tokens)
        self._tokens = tokens
        return ended

    def _join(self, joining: list[tuple[_Row, list[int]]], running: tuple | None, extra: list = ()) -> None:
        """Prefill the joining rows (in the forward of the running rows' `running` step, if any, with
        the `extra` parts of prefills ahead); they take the slots after the running rows, right
        aligned with them. A prompt is prefilled once per adapter that asks for it (keyed by the
        adapter's key and the ids)."""
        prompts = [p for _, p in joining]
        keyed = [(_key(row.lora), tuple(p)) for row, p in joining]
        lora_of = {k: row.lora for (row, _), (k, _) in zip(joining, keyed)}
        pairs = sorted(set(keyed))
        loras = [lora_of[k] for k, _ in pairs] if any(lora_of.values()) else None
        hits = (
            self.prefix_cache.hits([p for _, p in pairs], self.pad, self.forward, loras)
            if self.prefix_cache is not None
            else [None] * len(pairs)
        )
        # Sorted by what is left to prefill (the whole prompt where no prefix is cached).
        order_u = sorted(
            range(len(pairs)), key=lambda u: (len(pairs[u][1]) - (len(hits[u].ids) if hits[u] else 0), pairs[u])
        )
        pairs, hits = [pairs[u] for u in order_u], [hits[u] for u in order_u]
        loras = [lora_of[k] for k, _ in pairs] if loras else None
        unique = [p for _, p in pairs]
        index = {kp: u for u, kp in enumerate(pairs)}
        inverse = [index[kp] for kp in keyed]
        order = sorted(range(len(prompts)), key=lambda i: inverse[i])  # slots in prefill order
        inv = torch.tensor([inverse[i] for i in order], device=self.device)
        positions = torch.tensor([[len(prompts[i]) - 1] for i in order], device=self.device)
        if self.cache is None:
            room = min(max(row.config.max_new_tokens for row, _ in joining), _RESERVE_FIRST)
            self.cache, logits, mask, reserved = _prefill(
                self.model, unique, self.pad, max(map(len, unique)) + room, self.forward, hits, loras
            )
            self.joinable = reserved
            self.forward = self.forward if reserved else None  # (no reserved cache: layers other than full attention)
            if len(unique) < len(prompts):
                self.cache.batch_select_indices(inv)
                mask, logits = mask[inv], logits[inv]
            self.mask, self.logits, self.position = mask, logits, positions
        else:
            parts = list(_prefill_inputs(self.model, unique, self.pad, hits=hits, loras=loras))
            [now, *done] = _forward(self.model, self.forward, [running, *(part for *_, part in parts), *extra])
            width = max(map(len, unique))
            more = 0
            for layer in self.cache.layers:
                more = layer.make_room(len(self.rows) + len(prompts), width)
            if more:
                self.mask = torch.cat([self.mask.new_zeros(len(self.rows), more), self.mask], dim=1)
            mask = self.mask.new_zeros(len(prompts), self.mask.shape[1])
            for r, i in enumerate(order):
                mask[r, mask.shape[1] - len(prompts[i]) :] = 1
            logits = [now]
            for (lo, hi, _, bucket), lg in zip(parts, done):
                pick = inv[(inv >= lo) & (inv < hi)] - lo
                for layer, prefilled in zip(self.cache.layers, bucket[3].layers):
                    layer.append(prefilled.keys[pick], prefilled.values[pick])
                logits.append(lg[pick])
            self.mask = torch.cat([self.mask, mask])
            self.logits = torch.cat(logits)
            self.position = torch.cat([self.position, positions])
        self.rows += [joining[i][0] for i in order]

    def ahead(self, prompts: list[tuple[int, ...]], done: Callable[[int], None]) -> bool:
        """Prefill `prompts` into the prefix cache in the next step's forward, beside the running
        rows' tokens and any joining prompts (one product per linear layer for all: a forward's cost
        on a CPU is mostly reading the weights); `done(tokens prefilled)` after it. Prefills asked for
        before that step are taken together. False (nothing taken) when there are no running rows
        to ride on or no prefix cache: a caller then prefills on its own (`PrefixCache.warm`).

        Never a forward of its own while rows run: measured beside 8 chat clients with 8 sessions
        typing at 20 tokens/s, a prefill ahead refused here (one already waiting, or rows joining)
        and run on its own cost the chat 42% of its requests/s where prefill on commit cost 16%."""
        if self.prefix_cache is None or not self.rows:
            return False
        self._ahead.append((list(prompts), done))
        return True

    def _take_ahead(self) -> tuple | None:
        """The prefills ahead asked for since the last step, as (prompts, bases, parts, callbacks)
        from `PrefixCache.warm_parts`; None when there are none (or nothing new to prefill)."""
        pending, self._ahead = self._ahead, []
        if not pending:
            return None
        wanted, bases, parts = self.prefix_cache.warm_parts([p for ps, _ in pending for p in ps], self.pad)
        if not parts:
            for _, done in pending:
                done(0)
            return None
        return wanted, bases, parts, [done for _, done in pending]

    def _settle(self, warm: tuple) -> None:
        """Keep what a prefill ahead computed; its tokens are reported once (to the first caller)."""
        wanted, bases, parts, dones = warm
        n = self.prefix_cache.warm_store(wanted, bases, parts)
        for i, done in enumerate(dones):
            done(n if i == 0 else 0)

    @torch.inference_mode()
    def flush_ahead(self) -> None:
        """Run prefills ahead that found no step to ride (the rows ended first) in a forward of their own."""
        warm = self._take_ahead()
        if warm is not None:
            _forward(self.model, self.forward, [part for *_, part in warm[2]])
            self._settle(warm)

    def cancel(self, which: Callable[[Any], bool]) -> None:
        """Rows whose tag `which` accepts end at the next step, with the token it draws for them
        (`reason` "cancelled"; an answer the user interrupted)."""
        for row in [*self.rows, *(r for r, _ in self.joining)]:
            if which(row.tag):
                row.cancelled = True

    def _finished(self, row: _Row, tok: int) -> FinishReason | None:
        if row.cancelled:
            return "cancelled"
        if tok in row.eos:
            return "eos"
        stop = row.config.stop
        # A stop string is looked for in the decoding of the row's last tokens only (not the whole
        # row, every step): a character is at most 4 byte-level tokens, so this many cover it.
        if stop and any(s in decode(self.tok, row.ids[-(4 * max(map(len, stop)) + 4) :]) for s in stop):
            return "stop"  # earlier tokens did not complete it, so this token did
        if len(row.ids) >= row.config.max_new_tokens:
            return "length"
        return None

    def _drop(self, keep: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Ended rows leave: the last live rows move into their slots; columns no row sees go."""
        rows = len(keep)
        kept = set(keep)
        holes = [j for j in range(rows) if j not in kept]
        movers = [j for j in keep if j >= rows]
        order = list(range(rows))
        for h, s in zip(holes, movers):
            order[h] = s
        sel = torch.tensor(order, device=self.device)
        if self.joinable:
            for layer in self.cache.layers:
                layer.move_rows(holes, movers, rows)
        else:
            self.cache.batch_select_indices(sel)
        self.rows = [self.rows[j] for j in order]
        self.mask, self.position = self.mask[sel], self.position[sel]
        if self.joinable:
            first = int(self.mask.any(0).long().argmax())  # leading columns only padding
            if first:
                for layer in self.cache.layers:
                    layer.drop_left(first)
                self.mask = self.mask[:, first:]
        return tokens[sel]

    def _choose(self) -> tuple[torch.Tensor, dict[int, tuple[float, list[tuple[int, float]]]]]:
        """Each row's next token: by its own settings, under its grammar if any; and for
        the rows that ask for log-probs, `{row: (logprob, top)}` from the same logits (`_scored`)."""
        logits = self.logits
        if logits.dtype != torch.float32:
            logits = logits.float()  # (argmax and softmax of bf16 are slow on CPUs)
        asked = [j for j, row in enumerate(self.rows) if row.logprobs is not None]
        # The raw distribution, before the constraints below write into `logits` (a copy: indexed).
        raw = logits[asked].log_softmax(-1) if asked else None
        tokens = self._tokens_from(logits)
        return tokens, (self._scored(raw, asked, tokens) if asked else {})

    def _scored(
        self, raw: torch.Tensor, asked: list[int], tokens: torch.Tensor
    ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """The drawn token's raw log-prob and the k most likely (id, logprob) of each asking row."""
        drawn = raw.gather(1, tokens[asked][:, None])[:, 0].tolist()
        ks = [self.rows[j].config.logprobs for j in asked]
        top_v, top_i = raw.topk(max(ks), dim=-1) if max(ks) else (raw[:, :0], raw[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        return {j: (drawn[r], list(zip(top_i[r][: ks[r]], top_v[r][: ks[r]]))) for r, j in enumerate(asked)}

    def _tokens_from(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's token from float32 `logits` (written into: the grammars' masks)."""
        if self._masks is not None:  # rows without a grammar pay this list only
            ruled = [j for j, row in enumerate(self.rows) if row.matcher is not None]
            if ruled:
                rows = [self.rows[j] for j in ruled]
                self._masks.apply(logits, ruled, [r.matcher for r in rows], [r.eos for r in rows])
        if self._scratch is None or len(self._scratch) < len(logits):
            self._scratch = torch.empty(
                (max(len(logits), 2 * (len(self._scratch) if self._scratch is not None else 0)), logits.shape[1])
            )
        groups: dict[tuple, list[int]] = {}
        for j, row in enumerate(self.rows):
            c = row.config
            groups.setdefault((c.is_greedy, c.temperature, c.top_p), []).append(j)
        if len(groups) == 1:
            return self._pick(logits, list(range(len(self.rows))))
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        for idx in groups.values():
            sel = torch.tensor(idx, device=logits.device)
            tokens[sel] = self._pick(logits[sel], idx)
        return tokens

    def _pick(self, logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
        rows = [self.rows[j] for j in idx]
        if rows[0].config.is_greedy:
            return _pick(logits, None, rows[0].config)
        u = torch.tensor([r.uniforms[len(r.ids)] for r in rows], dtype=torch.float64, device=logits.device)
        return _pick(logits, u, rows[0].config, self._scratch)
