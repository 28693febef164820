"""The engine's full-attention cache layer: keys and values that grow in place in a buffer with
room to spare (app/engine/kv_cache.py holds every operation on whole caches)."""

from __future__ import annotations

import itertools

import torch
from transformers.cache_utils import DynamicLayer

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
            place(*pending)

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
        the layer holds, else :attr:`store`, else ``column``'s), exposed as in use but not written:
        the buffers ``[capacity, heads, columns, dim]`` and the first new column's index, for a
        caller that writes the keys and values there itself (the native step,
        app/models/native_step.py)."""
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


def place(bufs: torch.Tensor, rows: list[list[torch.Tensor]], columns: int) -> None:
    """Write each row's pieces (``[2, heads, tokens, head_dim]``, in order) into ``bufs``
    ``[2, rows, heads, >= columns, head_dim]``, ending at column ``columns``, zeros on their left."""
    for row, pieces in enumerate(rows):
        start = columns - sum(piece.shape[SEQ_DIM] for piece in pieces)
        bufs[:, row, :, :start].zero_()
        for piece in pieces:
            end = start + piece.shape[SEQ_DIM]
            bufs[:, row, :, start:end].copy_(piece)
            start = end
