"""LoRA adapters applied per row on one base model (many adapters in one batch), and the pool that
holds them: knows nothing of requests or of the decode loop.

A `Lora` is one PEFT LoRA adapter as plain tensors: per decoder layer and target module, its A
(r, in), B (out, r) and scaling, read from a PEFT adapter directory (`Lora.from_dir`, what
`dostream train` and the learners save) or from a `PeftModel` (`Lora.from_peft`). The sampler's
forward (`cached_forward.CachedForward.many`) takes a `Lora` (or None: the base model) per row:
the base model's products are computed once for every row, and each row adds its own adapter's
delta `B(A(h)) * scaling`, the ops and order PEFT computes it with, all adapters of a step in two
products per linear layer (S-LoRA/Punica's grouping: docs/reference.md), so a row draws what its
adapter alone draws, up to float rounding.

`AdapterPool` holds the adapters a server has loaded, keyed by a name that changes with each
version (a new version is a new key: nothing cached under the old one is ever read for it), least
recently used first out under a count and a byte budget (`dostream serve --max-adapters`,
`--adapter-cache-mb`). A row keeps a reference to its `Lora`: one evicted while rows decode with it
stays in memory until they end.
"""

from __future__ import annotations

import copy
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
    `modules` side by side, `widths` wide) each token's own adapter's delta `B(A(h)) * scaling`.

    All adapters of the step in one product for A (their ranks stacked, module by module) and one
    per module for B; a token's A outputs of other adapters are zeroed before B reads them, so its
    delta sums its own adapter's terms only. Tokens of no adapter add exact zeros. The stacked
    weights are made once per set of adapters and kept in `stacks` (the forward's, a few sets)."""

    def __init__(self, per_token: list[Lora | None], stacks: OrderedDict, keep: int = 8):
        found = {id(a): a for a in per_token if a is not None}
        adapters = sorted(found.values(), key=lambda a: (a.key, id(a)))
        ids = tuple(id(a) for a in adapters)
        if ids not in stacks:
            stacks[ids] = (adapters, {})  # (the adapters kept referenced: their ids stay theirs)
            while len(stacks) > keep:
                stacks.popitem(last=False)
        stacks.move_to_end(ids)
        self.adapters, self.stacks = adapters, stacks[ids][1]
        at = {id(a): i for i, a in enumerate(adapters)}
        self.which = torch.tensor([len(adapters) if a is None else at[id(a)] for a in per_token])
        self._masks: dict[tuple, torch.Tensor] = {}  # per step: the same layouts in every layer
        self._scales: dict[tuple, torch.Tensor] = {}

    def add(self, out: torch.Tensor, h: torch.Tensor, layer: int, modules: tuple[str, ...], widths) -> None:
        if self.which.device != h.device:
            self.which = self.which.to(h.device)
        stack = self.stacks.get((layer, modules))
        if stack is None:
            stack = self.stacks[(layer, modules)] = self._stack(layer, modules, h.dtype, h.device)
        if stack is False:  # no adapter of the step targets these modules here
            return
        a, owner, per_module = stack
        mask = self._masks.get(owner)
        if mask is None:
            owned = torch.tensor(owner, device=h.device)
            mask = self._masks[owner] = (self.which[:, None] == owned[None, :]).to(h.dtype)
        low = torch.nn.functional.linear(h, a) * mask  # (N, R): each token's own adapter's A(h)
        at = 0
        for width, (lo, hi, b, scales) in zip(widths, per_module):
            if b is not None:
                scale = self._scales.get(scales)
                if scale is None:
                    scale = torch.tensor(scales, dtype=h.dtype, device=h.device)[self.which][:, None]
                    self._scales[scales] = scale
                out[:, at : at + width] += torch.nn.functional.linear(low[:, lo:hi], b) * scale
            at += width

    def _stack(self, layer: int, modules: tuple[str, ...], dtype, device):
        """A stacked (R, in), module by module then adapter by adapter; per module its columns
        [lo, hi), B (out, hi - lo) and each adapter's scaling (0 for none, and for the base's rows)."""
        a_parts, owner, per_module, col = [], [], [], 0
        for m in modules:
            lo, b_parts, scales = col, [], []
            for i, adapter in enumerate(self.adapters):
                w = adapter.weights.get((layer, m))
                scales.append(0.0 if w is None else float(w[2]))
                if w is not None:
                    a_parts.append(w[0].to(device, dtype))
                    b_parts.append(w[1].to(device, dtype))
                    owner += [i] * w[0].shape[0]
                    col += w[0].shape[0]
            b = torch.cat(b_parts, dim=1) if b_parts else None
            per_module.append((lo, col, b, (*scales, 0.0)))
        if not a_parts:
            return False
        return torch.cat(a_parts), tuple(owner), per_module
