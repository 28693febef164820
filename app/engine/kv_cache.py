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
a transformers upgrade that changes them breaks this module, ``growing_layer.py`` (the full-attention
layer the engine's caches use) and their tests, nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from app.engine.growing_layer import SEQ_DIM as SEQ_DIM
from app.engine.growing_layer import GrowingLayer as GrowingLayer
from app.engine.growing_layer import place


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
        place(full, rows, columns)
        layer.update(full[0], full[1])
    return cache


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
