"""Every operation the engine performs on a KV cache, in one place.

The generation batches keep their rows left-padded over one transformers ``DynamicCache``
(tensors ``[batch, heads, tokens, head_dim]`` per layer). Rows leave (select), leading columns that
only padding uses are dropped (trim), a freshly prefilled batch joins a running one (merge with
left padding), and rows are set aside into a cache of their own (split) and join again (merge).

Sliding-window layers (Gemma 3) keep only the last ``window - 1`` token columns and count every
column they have seen (``cumulative_length``, which places the window in the attention mask). Left
padding changes only columns before a row's first token, so the same operations hold for them: a
trim or merge moves the count with the full layers and keeps the last ``min(count, window - 1)``
columns. These reach into transformers' cache layers (``layer.keys`` / ``layer.values``), so
a transformers upgrade that changes them breaks this module and its tests, nothing else.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import cast

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

SEQ_DIM = 2  # the token axis of a layer's key and value tensors


SPARE_COLUMNS = 64  # at least this many spare token columns when a layer's buffer is (re)made
SPARE_ROWS = 4  # at least this many spare rows (a quarter of the rows when more)


class GrowingLayer(DynamicLayer):
    """A full-attention layer whose keys and values grow in place. transformers' ``DynamicLayer``
    concatenates at every step, copying the whole cache (at 32 rows and ~65 tokens a quarter of a
    decode step of the default base on 2 cores); this one appends into spare columns of a buffer
    and exposes its used rows and columns as a view. Rows that leave are closed up in place
    (:meth:`keep_rows`), and rows that join go into spare rows (:meth:`join_rows`). The buffer is
    made anew, with room to spare (half the columns, at least :data:`SPARE_COLUMNS`; a quarter of
    the rows, at least :data:`SPARE_ROWS`), when it is full or when the engine replaced the tensors
    (columns trimmed, rows selected out of order: one copy, as each of those is anyway).

    ``store``: the dtype a fresh layer keeps its keys and values in (bf16 where the native step
    attends on bf16 dot products, which round them so anyway: half the bytes to read and copy);
    None: the writer's. A layer keeps the dtype it holds, except that a write through
    :meth:`update` (the model's own attention) turns it to the writer's dtype."""

    store: torch.dtype | None = None
    _k_base: torch.Tensor | None = None  # the buffers: [rows + spare, heads, columns + spare, dim]
    _v_base: torch.Tensor | None = None
    _k_view: torch.Tensor | None = None  # the keys as last exposed (replaced tensors: not this)
    _pending: tuple[torch.Tensor, list[list[torch.Tensor]], int] | None = None  # a fill not copied yet
    _stored: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    # keys and values: reading either copies a pending fill (:meth:`fill`) first
    @property
    def keys(self) -> torch.Tensor | None:
        self._settle()
        return self._stored[0]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._settle()
        self._stored = (value, self._stored[1])

    @property
    def values(self) -> torch.Tensor | None:
        self._settle()
        return self._stored[1]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._settle()
        self._stored = (self._stored[0], value)

    def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            _place(*pending)

    def get_seq_length(self) -> int:
        keys = self._stored[0]  # (no copy of a pending fill for its shape)
        return 0 if not self.is_initialized or keys is None or keys.numel() == 0 else keys.shape[SEQ_DIM]

    def key_dtype(self) -> torch.dtype | None:
        keys = self._stored[0]
        return keys.dtype if keys is not None and keys.numel() else None

    def forget_buffers(self) -> None:
        """Stop writing into the buffers: the next append makes new ones (another cache holds views
        of these rows now, or ``keys`` was replaced)."""
        self._k_base = self._v_base = self._k_view = None

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers' rows in use, while ``keys`` is still the view this layer exposed."""
        k, v, keys = self._k_base, self._v_base, self.keys
        if k is None or v is None or keys is None or keys is not self._k_view:
            return None
        rows = keys.shape[0]
        return k[:rows], v[:rows]

    def _expose(self, rows: int, columns: int) -> None:
        assert self._k_base is not None and self._v_base is not None
        self.keys = self._k_view = self._k_base[:rows, :, :columns]
        self.values = self._v_base[:rows, :, :columns]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.store = None  # (attention that reads what it writes: its dtype from now on)
        old = self._room(key_states, value_states, key_states.dtype)
        new, rows = old + key_states.shape[SEQ_DIM], key_states.shape[0]
        assert self._k_base is not None and self._v_base is not None
        self._k_base[:rows, :, old:new].copy_(key_states)
        self._v_base[:rows, :, old:new].copy_(value_states)
        self._expose(rows, new)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def reserve(self, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for the token columns of ``column``'s shape ([rows, heads, n, dim]; in the dtype
        the layer holds, else :attr:`store`, else ``column``'s), exposed as in use but not
        written: the buffers ``[capacity, heads, columns, dim]`` and the
        first new column's index, for a caller that writes the keys and values there itself (the
        native step, app/models/native_step.py)."""
        held = self.key_dtype()
        old = self._room(column, column, held or self.store or column.dtype)
        assert self._k_base is not None and self._v_base is not None
        self._expose(column.shape[0], old + column.shape[SEQ_DIM])
        return self._k_base, self._v_base, old

    def _room(self, key_states: torch.Tensor, value_states: torch.Tensor, dtype: torch.dtype) -> int:
        """Make room for ``key_states``' columns in buffers of ``dtype`` (a buffer anew when full,
        when the engine replaced the tensors, or in another dtype); the columns in use before them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        old = keys.shape[SEQ_DIM] if keys.numel() else 0
        new = old + key_states.shape[SEQ_DIM]
        rows = key_states.shape[0]
        bufs = self._buffers()
        if bufs is None or new > bufs[0].shape[SEQ_DIM] or bufs[0].dtype != dtype:
            columns = new + max(SPARE_COLUMNS, new // 2)
            capacity = rows + max(SPARE_ROWS, rows // 4)
            heads, dim = key_states.shape[1], key_states.shape[-1]
            self._k_base = key_states.new_empty(capacity, heads, columns, dim, dtype=dtype)
            self._v_base = value_states.new_empty(
                capacity, heads, columns, value_states.shape[-1], dtype=dtype
            )
            if old:
                self._k_base[:rows, :, :old].copy_(keys)
                self._v_base[:rows, :, :old].copy_(values)
        return old

    def fill(self, rows: list[list[torch.Tensor]], columns: int) -> None:
        """Start from cached prefixes: each row's pieces (``[2, heads, tokens, head_dim]``, in
        order) at the right end of ``columns`` columns, zeros on their left; one copy, straight
        into a buffer with room to spare, made when the keys or values are first read (the
        layer's attention in the prefill: they are then still in the CPU's caches, not read back
        from memory, which a copy of every layer up front costs at a ~1,000-token prefix)."""
        sample = next(piece for pieces in rows for piece in pieces)
        n, heads, dim = len(rows), sample.shape[1], sample.shape[-1]
        capacity = n + max(SPARE_ROWS, n // 4)
        width = columns + max(SPARE_COLUMNS, columns // 2)
        bufs = sample.new_empty(2, capacity, heads, width, dim, dtype=self.store or sample.dtype)
        self.lazy_initialization(bufs[0], bufs[1])
        self._k_base, self._v_base = bufs[0], bufs[1]
        self._expose(n, columns)
        self._pending = (bufs, rows, columns)

    def join_rows(self, keys: torch.Tensor, values: torch.Tensor, pad: int) -> bool:
        """Append rows (``pad`` zero columns on their left, then ``keys``/``values``) into spare
        rows, in place; False when the buffer has no room for them (or no buffer of its own)."""
        bufs = self._buffers()
        if bufs is None or self._k_base is None or self._v_base is None or self.keys is None:
            return False
        rows, columns = self.keys.shape[0], self.keys.shape[SEQ_DIM]
        end = rows + keys.shape[0]
        if end > self._k_base.shape[0] or pad + keys.shape[SEQ_DIM] != columns:
            return False
        for base, new in ((self._k_base, keys), (self._v_base, values)):
            base[rows:end, :, :pad].zero_()
            base[rows:end, :, pad:columns].copy_(new)
        self._expose(end, columns)
        return True

    def rebuild(self, parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Make the buffer anew from ``parts`` (keys, values, zero columns on their left), one
        after the other along the rows: one copy, with room to spare (a merge of batches)."""
        k0, v0, pad0 = parts[0]
        rows = sum(k.shape[0] for k, _, _ in parts)
        columns = pad0 + k0.shape[SEQ_DIM]
        capacity = rows + max(SPARE_ROWS, rows // 4)
        width = columns + max(SPARE_COLUMNS, columns // 2)
        k_base = k0.new_empty(capacity, k0.shape[1], width, k0.shape[-1])
        v_base = v0.new_empty(capacity, v0.shape[1], width, v0.shape[-1])
        start = 0
        for keys, values, pad in parts:
            end = start + keys.shape[0]
            for base, new in ((k_base, keys), (v_base, values)):
                base[start:end, :, :pad].zero_()
                base[start:end, :, pad:columns].copy_(new)
            start = end
        self._k_base, self._v_base = k_base, v_base
        self._expose(rows, columns)

    def keep_rows(self, kept: list[int]) -> bool:
        """Keep the rows ``kept`` (ascending) by moving the rows after the first gap down within
        the buffer, which then keeps growing in place; False when the layer cannot (no buffer of
        its own now, or an order other than ascending)."""
        bufs = self._buffers()
        if bufs is None or any(b <= a for a, b in itertools.pairwise(kept)):
            return False
        k_buf, v_buf = bufs
        n = k_buf.shape[SEQ_DIM] if self.keys is None else self.keys.shape[SEQ_DIM]
        first = next((j for j, i in enumerate(kept) if i != j), len(kept))
        if first < len(kept):
            moved = torch.tensor(kept[first:], dtype=torch.long, device=k_buf.device)
            end = first + len(moved)
            k_buf[first:end, :, :n].copy_(k_buf[moved, :, :n])
            v_buf[first:end, :, :n].copy_(v_buf[moved, :, :n])
        self._expose(len(kept), n)
        return True


def new_cache(config: PretrainedConfig, store: torch.dtype | None = None) -> DynamicCache:
    """An empty cache with the layer classes the model's config asks for (sliding windows...), its
    full-attention layers growing in place (:class:`GrowingLayer`, keeping ``store``)."""
    cache = DynamicCache(config=config)
    cache.layers = [_growing(store) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _growing(store: torch.dtype | None) -> GrowingLayer:
    layer = GrowingLayer()
    layer.store = store
    return layer


def mergeable(cache: DynamicCache) -> bool:
    """Whether rows can join this cache by left padding: full-attention and sliding-window dynamic
    layers (not recording their past for a rollback); other layer kinds make a batch run alone."""
    return all(
        type(layer) in (DynamicLayer, GrowingLayer)
        or (
            type(layer) is DynamicSlidingWindowLayer
            and not cast(DynamicSlidingWindowLayer, layer).record_past
        )
        for layer in cache.layers
    )


def _window_columns(layer: DynamicSlidingWindowLayer, seen: int) -> int:
    """How many columns a sliding layer that has seen ``seen`` columns keeps."""
    return min(seen, layer.sliding_window - 1)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    return cast(list[DynamicLayer], cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "an empty cache layer"
    return layer.keys, layer.values


def pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with ``n`` zero columns prepended along ``dim``."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


_PLAIN = (DynamicLayer, DynamicSlidingWindowLayer, GrowingLayer)  # layers of keys and values only


def select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep only the rows ``index`` [kept rows] of every layer, in that order (a growing layer
    moves only the rows after the first one that left, in place: rows leave a running batch every
    few steps, and a copy of the whole cache each time costs a large part of a step; the first
    rows of a layer without a buffer of its own: a view of them)."""
    kept = index.tolist()
    first = kept == list(range(len(kept)))  # the first rows: a view of them, no copy
    for layer in _layers(cache):
        if isinstance(layer, GrowingLayer) and layer.keep_rows(kept):
            continue
        if first and type(layer) in _PLAIN and layer.keys is not None and layer.values is not None:
            layer.keys, layer.values = layer.keys[: len(kept)], layer.values[: len(kept)]
        else:
            layer.batch_select_indices(index)


def split_rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache holding the rows ``index`` of ``cache`` (which keeps them too until it drops
    them): copies, or, for a range of consecutive rows (a tenant's last-admitted requests set
    aside), views of them, and ``cache`` gives up its buffers (a growing layer would write the rows
    it keeps into them), so only the rows it keeps are copied, when it drops the others."""
    rows = index.tolist()
    whole = rows == list(range(rows[0], rows[0] + len(rows))) if rows else False
    split = copy.copy(cache)
    split.layers = []
    for layer in _layers(cache):
        keys, values = _kv(layer)
        part = copy.copy(layer)
        if whole and type(layer) in _PLAIN:
            part.keys, part.values = keys[rows[0] : rows[-1] + 1], values[rows[0] : rows[-1] + 1]
            if isinstance(layer, GrowingLayer):
                layer.forget_buffers()
        else:
            part.keys, part.values = keys.index_select(0, index), values.index_select(0, index)
        if isinstance(part, GrowingLayer):  # a buffer of its own on the next update
            part.forget_buffers()
        split.layers.append(part)
    return split


def trim_left(cache: DynamicCache, start: int) -> None:
    """Drop the first ``start`` token columns of every layer (columns no row needs any more)."""
    if start == 0:
        return
    for layer in _layers(cache):
        keys, values = _kv(layer)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= start
            keep = _window_columns(layer, layer.cumulative_length)
            layer.keys, layer.values = (
                keys[:, :, keys.shape[2] - keep :],
                values[:, :, values.shape[2] - keep :],
            )
        else:
            layer.keys, layer.values = keys[:, :, start:], values[:, :, start:]


def merge_left_padded(into: DynamicCache, width: int, other: DynamicCache, other_width: int) -> None:
    """Append the rows of ``other`` to ``into``; both are left-aligned to the longer width
    (``width`` and ``other_width`` are their token columns), the shorter padded on the left."""
    target = max(width, other_width)
    for a, b in zip(_layers(into), _layers(other), strict=True):
        (ak, av), (bk, bv) = _kv(a), _kv(b)
        if isinstance(a, DynamicSlidingWindowLayer):
            assert isinstance(b, DynamicSlidingWindowLayer)
            seen = a.cumulative_length + target - width  # the same count for both after padding
            keep = _window_columns(a, seen)
            pad_a, pad_b = keep - ak.shape[SEQ_DIM], keep - bk.shape[SEQ_DIM]
            a.cumulative_length = seen
        else:
            pad_a, pad_b = target - width, target - other_width
            if isinstance(a, GrowingLayer):  # into its spare rows, or one new buffer
                if pad_a or not a.join_rows(bk, bv, pad_b):
                    a.rebuild([(ak, av, pad_a), (bk, bv, pad_b)])
                continue
        a.keys = torch.cat([pad_left(ak, pad_a, SEQ_DIM), pad_left(bk, pad_b, SEQ_DIM)])
        a.values = torch.cat([pad_left(av, pad_a, SEQ_DIM), pad_left(bv, pad_b, SEQ_DIM)])


def unused_leading_columns(mask: torch.Tensor) -> int:
    """How many leading columns of ``mask`` [batch, cached tokens + 1] are padding in every row
    (the last column, the next input token, always stays)."""
    used = mask[:, :-1].any(dim=0).nonzero()
    return int(used[0].item()) if used.numel() else mask.shape[1] - 1


# --- the prefix cache's side (app/engine/prefix_cache.py) -----------------------------------
def prefilled(
    config: PretrainedConfig, parts: list[list[torch.Tensor]], columns: int, store: torch.dtype | None = None
) -> DynamicCache:
    """A new cache of ``len(parts)`` rows and ``columns`` token columns, each row's cached prefix
    (its pieces in order, each ``[layers, 2, heads, tokens, head_dim]``; none for a miss) at its
    right end and zeros (padding) on its left. Full-attention layers copy the pieces once, straight
    into their buffers (:meth:`GrowingLayer.fill`); others go through their own update (sliding
    windows keep what they keep). ``store``: as :func:`new_cache`."""
    cache = new_cache(config, store)
    sample = next(piece for pieces in parts for piece in pieces)
    _, _, heads, _, dim = sample.shape
    for index, layer in enumerate(_layers(cache)):
        rows = [[piece[index] for piece in pieces] for pieces in parts]
        if isinstance(layer, GrowingLayer):
            layer.fill(rows, columns)
            continue
        full = sample.new_zeros(2, len(parts), heads, columns, dim)
        _place(full, rows, columns)
        layer.update(full[0], full[1])
    return cache


def _place(bufs: torch.Tensor, rows: list[list[torch.Tensor]], columns: int) -> None:
    """Write each row's pieces (``[2, heads, tokens, head_dim]``, in order) into ``bufs``
    ``[2, rows, heads, >= columns, head_dim]``, ending at column ``columns``, zeros on their left."""
    for row, pieces in enumerate(rows):
        start = columns - sum(piece.shape[SEQ_DIM] for piece in pieces)
        bufs[:, row, :, :start].zero_()
        for piece in pieces:
            end = start + piece.shape[SEQ_DIM]
            bufs[:, row, :, start:end].copy_(piece)
            start = end


def row_prefix(cache: DynamicCache, row: int, length: int) -> Callable[[int, int], torch.Tensor] | None:
    """The keys and values of the last ``length`` tokens of ``row``, as ``kv_of(start, end)`` ->
    ``[layers, 2, heads, end - start, head_dim]`` (a copy), or None when a layer no longer holds
    them all (a sliding window shorter than the row)."""
    layers = _layers(cache)
    if any(_kv(layer)[0].shape[SEQ_DIM] < length for layer in layers):
        return None

    def kv_of(start: int, end: int) -> torch.Tensor:
        out = []
        for layer in layers:
            keys, values = _kv(layer)
            first = keys.shape[SEQ_DIM] - length
            out.append(
                torch.stack(
                    [keys[row, :, first + start : first + end], values[row, :, first + start : first + end]]
                )
            )
        return torch.stack(out)

    return kv_of
