"""KV cache layouts (transformers `DynamicCache` layers): where keys and values sit in storage,
knowing nothing of prompts, tokens or sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _reserved_cache(model_config, capacity: int):
    """A transformers `DynamicCache` whose layers write into reserved storage instead of
    concatenating (the stock layer copies the whole cache every token), filled by `_prefill`.

    A layer's storage is (slots, heads, capacity, head_dim); the live cache is rows [0, n) and
    columns [lo, end) of it, and `keys`/`values` are views of that block. New tokens go in column
    `end`; when it is full the block moves to column 0, into storage twice as large if need be (a
    copy per doubling, not per token). Rows join at slots n.. (`append`) and leave by moving the
    last rows into their slots (`move_rows`, a copy of the moved rows only); columns every live row
    ignores are dropped from the left (`drop_left`, no copy). Stale columns left of a row's prompt
    hold finite values from earlier rows (or zeros): masked, and a NaN would survive a mask.
    None for models with other layer kinds (sliding windows, ...): they get the stock cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def load(self, lo: int, hi: int, offset: int, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
            """Rows lo:hi hold a prefill of width keys.shape[2], right aligned at `offset`."""
            if not self.is_initialized:
                self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
                self._k = keys.new_zeros(rows, keys.shape[1], capacity, keys.shape[3])
                self._v = values.new_zeros(rows, values.shape[1], capacity, values.shape[3])
                self._lo, self._end, self._n = 0, offset + keys.shape[2], rows
            self._k[lo:hi, :, offset : self._end] = keys
            self._v[lo:hi, :, offset : self._end] = values
            self._view()

        def _view(self) -> None:
            self.keys = self._k[: self._n, :, self._lo : self._end]
            self.values = self._v[: self._n, :, self._lo : self._end]

        def relayout(self, slots: int, capacity: int, lo: int) -> None:
            """Fresh storage of `slots` x `capacity`, the live block copied to start at column `lo`."""
            width = self._end - self._lo
            k = self._k.new_zeros(slots, self._k.shape[1], capacity, self._k.shape[3])
            v = self._v.new_zeros(slots, self._v.shape[1], capacity, self._v.shape[3])
            k[: self._n, :, lo : lo + width] = self.keys
            v[: self._n, :, lo : lo + width] = self.values
            self._k, self._v, self._lo, self._end = k, v, lo, lo + width
            self._view()

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if not self.is_initialized:
                raise RuntimeError("the reserved cache is filled by _prefill first")
            if self._end + n > self._k.shape[2]:  # full: to column 0, doubled if that is not room enough
                capacity = self._k.shape[2]
                while self._end - self._lo + n > capacity:
                    capacity *= 2
                self.relayout(self._k.shape[0], capacity, 0)
            self._k[: self._n, :, self._end : self._end + n] = key_states
            self._v[: self._n, :, self._end : self._end + n] = value_states
            self._end += n
            self._view()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._n = len(indices)
            self._view()

        def make_room(self, rows: int, width: int) -> int:
            """Room for `rows` live rows and a live block `width` columns wide (widened on the
            left); returns how many columns were added on the left."""
            slots, have = self._k.shape[0], self._end - self._lo
            more = max(0, width - have)
            if rows > slots or self._end - width < 0:
                self.relayout(max(rows, 2 * slots if rows > slots else slots), max(self._k.shape[2], 2 * width), more)
            self._lo = min(self._lo, self._end - width)
            self._view()
            return more

        def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """New rows at slots n.., their prefill right aligned at the last column (`make_room` first)."""
            rows, width = keys.shape[0], keys.shape[2]
            self._k[self._n : self._n + rows, :, self._end - width : self._end] = keys
            self._v[self._n : self._n + rows, :, self._end - width : self._end] = values
            self._n += rows
            self._view()

        def move_rows(self, dst: list[int], src: list[int], rows: int) -> None:
            """Rows `src` move to slots `dst`; `rows` rows stay live."""
            if dst:
                self._k[dst, :, self._lo : self._end] = self._k[src, :, self._lo : self._end]
                self._v[dst, :, self._lo : self._end] = self._v[src, :, self._lo : self._end]
            self._n = rows
            self._view()

        def drop_left(self, columns: int) -> None:
            self._lo += columns
            self._view()

    cache = DynamicCache(config=model_config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [ReservedLayer() for _ in cache.layers]
    return cache


def _prefixed_cache(model_config, hits: list[_CachedPrefix | None], rest: list[int], width: int, new: int):
    """A bucket's prefill cache in which row r's cached prefix sits right before its rest[r] new
    tokens, right aligned in `width` columns: the layout of a prefill of the whole prompts.

    The forward runs `new` columns of new tokens; a row with fewer has padding tokens in the first
    ones, where its prefix may end: there the layer keeps the prefix's keys and values and drops
    what the padding tokens computed. So a row's real columns are contiguous, never with padding
    inside them (padding inside changes how the attention sums round, while leading padding
    leaves it as it is: the row then samples bit for bit as it does beside other batch mates)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PrefixedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            # into the columns reserved for them, beside the prefix (no concatenation: a copy of the whole)
            torch.where(real, key_states, self.tail_keys, out=self.tail_keys)
            torch.where(real, value_states, self.tail_values, out=self.tail_values)
            self.keys, self.values = self.whole
            return self.keys, self.values

    first = next(h for h in hits if h is not None)
    device = first.keys[0].device
    real = torch.zeros(len(hits), 1, new, 1, dtype=torch.bool, device=device)
    for r, n in enumerate(rest):
        real[r, :, new - n :] = True
    groups: dict[tuple[int, int], tuple[_CachedPrefix, list[int]]] = {}  # (prefix, where it ends) -> rows
    for r, (h, n) in enumerate(zip(hits, rest)):
        if h is not None:
            groups.setdefault((id(h), n), (h, []))[1].append(r)
    cache = DynamicCache(config=model_config)
    cache.layers = []
    for i, (k0, v0) in enumerate(zip(first.keys, first.values)):
        keys = k0.new_zeros(len(hits), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(hits), v0.shape[1], width, v0.shape[3])
        for (_, n), (h, rows) in groups.items():  # (a prefix several rows share: one copy per run of rows)
            for lo, hi in _runs(rows):  # slices, not a list index: index_put is ~3x slower than a copy
                keys[lo:hi, :, width - n - len(h.ids) : width - n] = h.keys[i]
                values[lo:hi, :, width - n - len(h.ids) : width - n] = h.values[i]
        layer = PrefixedLayer()
        layer.lazy_initialization(keys, values)
        layer.whole = keys, values
        layer.keys, layer.values = keys[:, :, : width - new], values[:, :, : width - new]
        layer.tail_keys, layer.tail_values = keys[:, :, width - new :], values[:, :, width - new :]
        cache.layers.append(layer)
    return cache


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as (lo, hi) runs of consecutive ones: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


@dataclass(eq=False)
class _CachedPrefix:
    """A cached prefix: its token ids and, per layer, its keys and values (1, kv_heads, len, head_dim),
    computed under `adapter`."""

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    adapter: str = ""  # the key of the adapter it was computed under ("": the base model)
