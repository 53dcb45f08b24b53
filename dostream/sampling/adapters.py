"""LoRA adapters applied per row on one base model (many adapters in one batch), and the pool that
holds them: knows nothing of requests or of the decode loop.

A `Lora` is one PEFT LoRA adapter as plain tensors: per decoder layer and target module, its A
(r, in), B (out, r) and scaling, read from a PEFT adapter directory (`Lora.from_dir`, what
`dostream train` and the learners save) or from a `PeftModel` (`Lora.from_peft`). The sampler's
forward (`cached_forward.CachedForward.many`) takes a `Lora` (or None: the base model) per row:
the base model's products are computed once for every row, and each row adds its own adapter's
delta `B(A(h)) * scaling`, the ops and order PEFT computes it with: the rows grouped per adapter,
one batched product for A and one per module for B, each adapter over its own rows only
(S-LoRA/Punica's grouping: docs/reference.md), so a row pays its own adapter's products whatever
shares the step, and draws what its adapter alone draws, up to float rounding (a batch entry of
the same shape rounds as PEFT's `F.linear`; other row counts may round otherwise).

`AdapterPool` holds the adapters a server has loaded, keyed by a name that changes with each
version (a new version is a new key: nothing cached under the old one is ever read for it), least
recently used first out under a count and a byte budget (`dostream serve --max-adapters`,
`--adapter-cache-mb`). A row keeps a reference to its `Lora`: one evicted while rows decode with it
stays in memory until they end.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# The linear layers of a Llama-family decoder layer an adapter may target (PEFT's "all-linear").
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A step's batch spans idle bank slots (padded rows, no weights gathered) up to this many rows.
_IDLE_ROWS = 64
_KEY = re.compile(r"\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight$")


@dataclass(eq=False)
class Lora:
    """One LoRA adapter: `weights[(layer, module)] = (A, B, scaling)`, A (r, in), B (out, r)."""

    key: str  # names the adapter and its version: rows, prefill buckets and prefix entries are keyed by it
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("Lora: an adapter's key is a non-empty name (the empty key is the base model's)")
        bad = sorted({m for _, m in self.weights} - set(TARGETS))
        if bad:
            raise ValueError(f"adapter {self.key!r}: targets {bad}; per-row adapters take {', '.join(TARGETS)}")

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.weights.values())

    @classmethod
    def from_dir(cls, key: str, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Lora:
        """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors or .bin)."""
        path = Path(path)
        config = json.loads((path / "adapter_config.json").read_text())
        _refuse_variants(key, config)
        if (path / "adapter_model.safetensors").exists():
            from safetensors.torch import load_file

            state = load_file(str(path / "adapter_model.safetensors"))
        else:
            state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for name, tensor in state.items():
            m = _KEY.search(name)
            if m is None:
                raise ValueError(f"adapter {key!r}: {name!r} is not a LoRA weight of a decoder layer")
            parts.setdefault((int(m[1]), m[2]), {})[m[3]] = tensor.to(dtype)
        alpha, rslora = config["lora_alpha"], config.get("use_rslora", False)
        weights = {}
        for where, ab in parts.items():
            a, b = ab["A"], ab["B"]
            r = a.shape[0]  # (rank_pattern: each module's own rank)
            weights[where] = (a, b, alpha / r**0.5 if rslora else alpha / r)  # PEFT's scaling
        return cls(key, weights)

    @classmethod
    def from_peft(cls, key: str, model, adapter: str = "default") -> Lora:
        """The adapter `adapter` of a PEFT model (its LoRA layers' own tensors, not copied)."""
        from peft.tuners.lora import Linear as LoraLinear

        weights = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear) and adapter in module.lora_A:
                if module.lora_variant.get(adapter) is not None or module.merged:
                    raise ValueError(f"adapter {key!r}: {name} is merged or a LoRA variant (DoRA, ...)")
                m = re.search(r"\.layers\.(\d+)\.\w+\.(\w+)$", name)
                weights[(int(m[1]), m[2])] = (
                    module.lora_A[adapter].weight.detach(),
                    module.lora_B[adapter].weight.detach(),
                    module.scaling[adapter],
                )
        return cls(key, weights)


def _refuse_variants(key: str, config: dict) -> None:
    """What a per-row delta B(A(h)) * scaling does not compute: say so rather than sample wrongly."""
    bad = [
        what
        for what, on in (
            ("use_dora", config.get("use_dora")),
            ("modules_to_save", config.get("modules_to_save")),
            ("alpha_pattern", config.get("alpha_pattern")),
            ("bias", config.get("bias", "none") != "none"),
            ("lora_bias", config.get("lora_bias")),
        )
        if on
    ]
    if bad:
        raise ValueError(f"adapter {key!r}: {', '.join(bad)} set; per-row adapters are plain LoRA")


class AdapterPool:
    """Adapters by key, loaded on first use (`get(key, path)`), least recently used first out once
    more than `max_adapters` are held or they take more than `max_bytes`. Thread-safe (the request
    threads ask, the sampling thread uses). `loads` and `evictions` count (tests, metrics)."""

    def __init__(
        self,
        *,
        max_adapters: int = 8,
        max_bytes: float = float("inf"),
        dtype=torch.float32,
        base: tuple | Callable[[], tuple] | None = None,
    ):
        self.max_adapters, self.max_bytes, self.dtype = max_adapters, max_bytes, dtype
        self._held: OrderedDict[str, Lora] = OrderedDict()
        self._lock = threading.Lock()
        self._base = base  # (model, None, its CachedForward), or what loads it on first use
        self._merged: OrderedDict[str, tuple] = OrderedDict()  # `target` without CachedForward
        self.loads = self.evictions = 0

    def base(self) -> tuple:
        """(base model, None, its `CachedForward`): the model every held adapter is added to,
        loaded on first use where the pool was given a function."""
        with self._lock:
            if callable(self._base):
                self._base = tuple(self._base())
            if self._base is None:
                raise ValueError("this pool has no base model")
            return self._base

    def target(self, lora: Lora) -> tuple:
        """The (model, adapter name, forward) rows of `lora` decode on: the base, where it has the
        sampler's own forward (rows of every adapter in one decode); else (models of other families)
        a copy of the base with `lora` merged, as PEFT merges it: one adapter per decode. The last
        two merged copies are kept (each a model's size)."""
        base = self.base()
        if base[2] is not None:
            return base
        with self._lock:
            found = self._merged.get(lora.key)
            if found is not None:
                self._merged.move_to_end(lora.key)
                return found
        model = copy.deepcopy(base[0])
        layers = model.model.layers
        with torch.no_grad():
            for (i, name), (a, b, scaling) in lora.weights.items():
                part = layers[i].self_attn if hasattr(layers[i].self_attn, name) else layers[i].mlp
                weight = getattr(part, name).weight
                weight += ((b @ a) * scaling).to(weight.dtype)  # PEFT's merge: W + (B @ A) * scaling
        value = (model, lora.key, None)
        with self._lock:
            self._merged[lora.key] = value
            while len(self._merged) > 2:
                self._merged.popitem(last=False)
        return value

    def get(self, key: str, path: str | Path | Callable[[], Lora] | None = None) -> Lora:
        """The adapter `key`, marked recently used; loaded from `path` (a PEFT directory, or a
        function making the `Lora`) when not held. A key names one version: a new version is a new key."""
        with self._lock:
            lora = self._held.get(key)
            if lora is not None:
                self._held.move_to_end(key)
                return lora
        if path is None:
            raise KeyError(f"adapter {key!r} is not loaded and no directory was given for it")
        lora = path() if callable(path) else Lora.from_dir(key, path, dtype=self.dtype)
        with self._lock:
            self._held[key] = lora
            self._held.move_to_end(key)
            self.loads += 1
            while len(self._held) > 1 and (
                len(self._held) > self.max_adapters or sum(a.nbytes for a in self._held.values()) > self.max_bytes
            ):
                self._held.popitem(last=False)
                self.evictions += 1
        return lora

    def held(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._held)


class Mix:
    """The adapters of one forward's tokens (`CachedForward.many`): `add(out, h, layer, modules,
    widths)` adds to a linear layer's output `out` (the base product of `h`, the outputs of
    `modules` side by side, `widths` wide) each token's own adapter's delta `B(A(h)) * scaling`,
    the ops and order PEFT computes it with. Tokens of no adapter get nothing added.

    S-LoRA/Punica's grouping: the tokens gathered adapter by adapter (padded to the largest group),
    two batched products per linear layer, one batch entry per adapter over its own tokens only (A of
    the fused modules stacked, then B module by module): a token pays its own adapter's products,
    whatever else the step holds, and a step of one adapter is the same products over all its
    tokens, nothing gathered. The weights lie side by side in a `_Bank`, laid out as `F.linear`
    reads them (a batch entry of the same shape rounds as PEFT's `F.linear` does); `stacks` (the
    forward's) holds it between steps."""

    def __init__(self, per_token: list[Lora | None], stacks: dict, keep: int = 8):
        found = {id(a): a for a in per_token if a is not None}
        self.adapters = sorted(found.values(), key=lambda a: (a.key, id(a)))
        self.bank = stacks.get("bank")
        if self.bank is None:
            self.bank = stacks["bank"] = _Bank(keep)
        slots = self.bank.place(self.adapters)
        at = {id(a): i for i, a in enumerate(self.adapters)}
        groups: list[list[int]] = [[] for _ in self.adapters]
        for i, a in enumerate(per_token):
            if a is not None:
                groups[at[id(a)]].append(i)
        rows = [i for i, a in enumerate(per_token) if a is not None]
        # The bank's slots [lo, top) as the batch (a view, no weight gathered) unless the slots between
        # the step's would pad it by many rows (`_IDLE_ROWS`): a batch entry of an idle slot costs
        # its padded rows' products, a gather of the step's slots copies their weights (at rank 16,
        # SmolLM2's MLP: ~1.5 MB a layer, a dozen tokens' products).
        lo, top = min(slots), max(slots) + 1
        width = max(map(len, groups))  # the rows of each batch entry
        idle = (top - lo - len(slots)) * width
        entries = list(range(lo, top)) if idle <= _IDLE_ROWS else sorted(slots)
        self.span = (lo, top) if entries == list(range(lo, top)) else None
        by_slot = dict(zip(slots, groups))
        index, back = [rows[0]] * (len(entries) * width), {}
        for e, s in enumerate(entries):
            for j, i in enumerate(by_slot.get(s, ())):
                index[e * width + j] = i
                back[i] = e * width + j
        self.shape = (len(entries), width)
        back = [back[i] for i in rows]
        # Nothing gathered where the batch is the step's tokens in order: one adapter, every token.
        self.gather = index != list(range(len(per_token)))
        self.every = len(rows) == len(per_token)
        self._layout = {"index": index, "back": back, "rows": rows, "select": entries}
        self._tensors: dict[str, torch.Tensor] = {}

    def _tensor(self, name: str, device) -> torch.Tensor:
        got = self._tensors.get(name)
        if got is None or got.device != device:
            got = self._tensors[name] = torch.tensor(self._layout[name], device=device)
        return got

    def add(self, out: torch.Tensor, h: torch.Tensor, layer: int, modules: tuple[str, ...], widths) -> None:
        stack = self.bank.stack(layer, modules, widths, h.dtype, h.device)
        if stack is None:  # no adapter of the bank targets these modules here
            return
        a, bs, scale = stack
        if self.span is not None:
            lo, top = self.span
            a, bs, scale = a[lo:top], [b[lo:top] for b in bs], scale[lo:top]
        else:  # only the step's slots
            pick = self._tensor("select", h.device)
            a, bs, scale = a[pick], [b[pick] for b in bs], scale[pick]
        entries, width = self.shape
        grouped = h.index_select(0, self._tensor("index", h.device)) if self.gather else h
        low = torch.bmm(grouped.view(entries, width, -1), a.transpose(1, 2))  # (entries, width, R): A(h)
        parts, lo = [], 0
        for b in bs:
            parts.append(torch.bmm(low[:, :, lo : lo + b.shape[2]], b.transpose(1, 2)))
            lo += b.shape[2]
        delta = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)) * scale
        delta = delta.view(entries * width, -1)
        if self.gather:
            delta = delta.index_select(0, self._tensor("back", h.device))
        if self.every:
            out += delta
        else:
            out.index_add_(0, self._tensor("rows", h.device), delta)


class _Bank:
    """The weights of the adapters `Mix` groups, side by side for batched products: per decoder
    layer and fused modules, A (slots, R, in) (each module's A, its rank padded with zeros to the
    largest of the bank's), per module B (slots, out, r) and the scaling per output column (slots,
    1, width). An adapter keeps its slot while it is used; a new one takes
    a new slot up to `size`, then the slot used least recently. A slot's weights are written when
    first read (`stack`), layer by layer."""

    def __init__(self, size: int = 8):
        self.size, self.members, self.used, self.steps, self.version = size, [], [], 0, 0
        self._stacks: dict[tuple, dict] = {}

    def place(self, adapters: list[Lora]) -> list[int]:
        """The slots of a step's adapters, placing those not held."""
        self.steps += 1
        where = {id(m): s for s, m in enumerate(self.members) if m is not None}
        for a in adapters:  # the step's held adapters first: none of their slots is taken
            if id(a) in where:
                self.used[where[id(a)]] = self.steps
        slots = []
        for a in adapters:
            s = where.get(id(a))
            if s is None:
                if len(self.members) < self.size or all(u == self.steps for u in self.used):
                    self.members.append(None)
                    self.used.append(0)
                s = min(range(len(self.members)), key=lambda k: (self.used[k] == self.steps, self.used[k], k))
                self.members[s] = a  # (the adapter kept referenced while it holds the slot)
                self.used[s] = self.steps
                self.version += 1
            slots.append(s)
        return slots

    def stack(self, layer: int, modules: tuple[str, ...], widths, dtype, device):
        """(A, [B per module], scaling) of `modules` of `layer`, every slot's; None where no adapter
        of the bank targets them."""
        key = (layer, modules)
        entry = self._stacks.get(key)
        if entry is not None and (entry["version"], entry["dtype"], entry["device"]) == (self.version, dtype, device):
            return entry["tensors"]
        held = [(s, m) for s, m in enumerate(self.members) if m is not None]
        ranks, width_in = [], None
        for name in modules:
            found = [m.weights[(layer, name)][0] for _, m in held if (layer, name) in m.weights]
            ranks.append(max((w.shape[0] for w in found), default=0))
            width_in = found[0].shape[1] if found else width_in
        tensors, filled = None, None
        if width_in is not None:
            reuse = (
                entry is not None
                and entry["tensors"] is not None
                and (entry["dtype"], entry["device"], entry["ranks"]) == (dtype, device, ranks)
                and entry["tensors"][0].shape[0] >= len(self.members)
            )
            if reuse:
                tensors, filled = entry["tensors"], entry["filled"]
            else:
                slots, zeros = (
                    max(len(self.members), self.size),
                    functools.partial(torch.zeros, dtype=dtype, device=device),
                )
                tensors = (
                    zeros(slots, sum(ranks), width_in),
                    [zeros(slots, w, r) for r, w in zip(ranks, widths)],
                    zeros(slots, 1, sum(widths)),
                )
                filled = [None] * slots
            for s, m in held:
                if filled[s] is not m:
                    _write(m, tensors, s, layer, modules, ranks, widths)
                    filled[s] = m
        self._stacks[key] = dict(
            version=self.version, dtype=dtype, device=device, ranks=ranks, tensors=tensors, filled=filled
        )
        return tensors


def _write(lora: Lora, tensors, slot: int, layer: int, modules, ranks, widths) -> None:
    """`lora`'s weights at `modules` of `layer` into `slot` of a `_Bank` stack (zeros where none)."""
    a, bs, scale = tensors
    a[slot].zero_(), scale[slot].zero_()
    lo = col = 0
    for name, rank, width, b in zip(modules, ranks, widths, bs):
        b[slot].zero_()
        w = lora.weights.get((layer, name))
        if w is not None:
            r = w[0].shape[0]
            a[slot, lo : lo + r] = w[0]
            b[slot, :, :r] = w[1]
            scale[slot, :, col : col + width] = float(w[2])
        lo, col = lo + rank, col + width
