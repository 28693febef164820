"""KV-cache surgery on real transformers cache objects built from random tensors (no model)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from app.engine import kv_cache

LAYERS, HEADS, DIM = 2, 3, 4


def cache_of(rows: int, tokens: int, seed: int) -> tuple[DynamicCache, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    keys = []
    for layer in range(LAYERS):
        k = torch.randn(rows, HEADS, tokens, DIM, generator=gen)
        cache.update(k, k * 2, layer)
        keys.append(k)
    return cache, keys


def test_select_rows_keeps_those_rows_in_order() -> None:
    cache, keys = cache_of(4, 5, 0)
    kv_cache.select_rows(cache, torch.tensor([3, 1]))
    for layer, k in zip(cache.layers, keys, strict=True):
        assert torch.equal(layer.keys, k[[3, 1]]) and torch.equal(layer.values, 2 * k[[3, 1]])


def test_trim_left_drops_leading_columns() -> None:
    cache, keys = cache_of(2, 6, 1)
    kv_cache.trim_left(cache, 0)
    assert cache.layers[0].keys.shape[2] == 6
    kv_cache.trim_left(cache, 4)
    for layer, k in zip(cache.layers, keys, strict=True):
        assert torch.equal(layer.keys, k[:, :, 4:]) and torch.equal(layer.values, 2 * k[:, :, 4:])


def test_merge_pads_the_shorter_cache_on_the_left() -> None:
    a, ka = cache_of(2, 5, 2)
    b, kb = cache_of(3, 3, 3)
    kv_cache.merge_left_padded(a, 5, b, 3)
    for layer, x, y in zip(a.layers, ka, kb, strict=True):
        assert layer.keys.shape == (5, HEADS, 5, DIM)
        assert torch.equal(layer.keys[:2], x)
        assert torch.equal(layer.keys[2:, :, 2:], y) and layer.keys[2:, :, :2].abs().sum() == 0
        assert torch.equal(layer.values[2:, :, 2:], 2 * y)
    # and the other way round: the running batch is the shorter one
    c, kc = cache_of(1, 2, 4)
    d, kd = cache_of(1, 4, 5)
    kv_cache.merge_left_padded(c, 2, d, 4)
    assert torch.equal(c.layers[0].keys[0, :, 2:], kc[0][0]) and torch.equal(c.layers[0].keys[1], kd[0][0])


def test_unused_leading_columns_of_a_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert kv_cache.unused_leading_columns(mask) == 2
    assert kv_cache.unused_leading_columns(torch.tensor([[1, 1], [0, 1]])) == 0
    assert kv_cache.unused_leading_columns(torch.tensor([[0, 0, 1]])) == 2  # only the next token


def test_pad_left() -> None:
    t = torch.ones(2, 3)
    assert torch.equal(kv_cache.pad_left(t, 2, 1), torch.tensor([[0.0, 0, 1, 1, 1]] * 2))
    assert kv_cache.pad_left(t, 0, 1) is t


def test_only_full_attention_dynamic_layers_are_mergeable() -> None:
    cache, _ = cache_of(1, 2, 6)
    assert kv_cache.mergeable(cache)
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    assert not kv_cache.mergeable(cache)
