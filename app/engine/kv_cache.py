"""Every operation the engine performs on a KV cache, in one place.

The generation batches keep their rows left-padded over one transformers ``DynamicCache``
(tensors ``[batch, heads, tokens, head_dim]`` per layer). Rows leave (select), leading columns that
only padding uses are dropped (trim), and a freshly prefilled batch joins a running one (merge with
left padding). These reach into transformers' cache layers (``layer.keys`` / ``layer.values``), so
a transformers upgrade that changes them breaks this module and its tests, nothing else.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

SEQ_DIM = 2  # the token axis of a layer's key and value tensors


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty cache with the layer classes the model's config asks for (sliding windows...)."""
    return DynamicCache(config=config)


def mergeable(cache: DynamicCache) -> bool:
    """Whether rows can join this cache by left padding: only plain full-attention dynamic layers
    (a sliding-window layer keeps a window of its own length, which padding would shift)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


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


def select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep only the rows ``index`` [kept rows] of every layer, in that order."""
    cache.batch_select_indices(index)


def trim_left(cache: DynamicCache, start: int) -> None:
    """Drop the first ``start`` token columns of every layer (columns no row needs any more)."""
    if start == 0:
        return
    for layer in _layers(cache):
        keys, values = _kv(layer)
        layer.keys, layer.values = keys[:, :, start:], values[:, :, start:]


def merge_left_padded(into: DynamicCache, width: int, other: DynamicCache, other_width: int) -> None:
    """Append the rows of ``other`` to ``into``; both are left-aligned to the longer width
    (``width`` and ``other_width`` are their token columns), the shorter padded on the left."""
    target = max(width, other_width)
    for a, b in zip(_layers(into), _layers(other), strict=True):
        (ak, av), (bk, bv) = _kv(a), _kv(b)
        a.keys = torch.cat(
            [pad_left(ak, target - width, SEQ_DIM), pad_left(bk, target - other_width, SEQ_DIM)]
        )
        a.values = torch.cat(
            [pad_left(av, target - width, SEQ_DIM), pad_left(bv, target - other_width, SEQ_DIM)]
        )


def unused_leading_columns(mask: torch.Tensor) -> int:
    """How many leading columns of ``mask`` [batch, cached tokens + 1] are padding in every row
    (the last column, the next input token, always stays)."""
    used = mask[:, :-1].any(dim=0).nonzero()
    return int(used[0].item()) if used.numel() else mask.shape[1] - 1
