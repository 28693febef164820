"""KV-cache surgery on real transformers cache objects built from random tensors (no model)."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig
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


def test_dynamic_and_sliding_layers_are_mergeable_but_not_past_recording_ones() -> None:
    cache, _ = cache_of(1, 2, 6)
    assert kv_cache.mergeable(cache)
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    assert kv_cache.mergeable(cache)
    cache.layers[-1].activate_past_recording()
    assert not kv_cache.mergeable(cache)


def sliding_cache(k: torch.Tensor, window: int) -> DynamicCache:
    """A one-layer sliding-window cache that has seen the columns of ``k`` (as a model writes it)."""
    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=window)]
    cache.update(k, k * 2, 0)
    return cache


def assert_same_layer(got: DynamicCache, want: DynamicCache) -> None:
    a, b = got.layers[0], want.layers[0]
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.cumulative_length == b.cumulative_length
    assert a.get_mask_sizes(1) == b.get_mask_sizes(1)


def test_sliding_layers_merge_and_trim_as_if_they_had_seen_the_padded_rows() -> None:
    gen = torch.Generator().manual_seed(7)
    for window in (4, 16):  # the window cut some columns already / none yet
        ka = torch.randn(2, HEADS, 5, DIM, generator=gen)
        kb = torch.randn(3, HEADS, 3, DIM, generator=gen)
        merged = sliding_cache(ka, window)
        kv_cache.merge_left_padded(merged, 5, sliding_cache(kb, window), 3)
        want = sliding_cache(torch.cat([ka, kv_cache.pad_left(kb, 2, 2)]), window)
        assert_same_layer(merged, want)
        # the shorter one running, the longer one joining
        merged = sliding_cache(kb, window)
        kv_cache.merge_left_padded(merged, 3, sliding_cache(ka, window), 5)
        assert_same_layer(merged, sliding_cache(torch.cat([kv_cache.pad_left(kb, 2, 2), ka]), window))
        # trimming leading padding: as if those columns had never been there
        padded = torch.cat([torch.zeros(2, HEADS, 3, DIM), ka], dim=2)
        trimmed = sliding_cache(padded, window)
        kv_cache.trim_left(trimmed, 3)
        assert_same_layer(trimmed, sliding_cache(ka, window))


def test_growing_layers_hold_what_concatenation_would_and_append_in_place() -> None:
    """A cache of GrowingLayers equals transformers' concatenating DynamicLayers through appends,
    row selection, trims and merges; appends within the spare columns write into the same buffer."""
    gen = torch.Generator().manual_seed(5)
    grown = DynamicCache()
    grown.layers = [kv_cache.GrowingLayer() for _ in range(LAYERS)]
    plain = DynamicCache()

    def append(rows: int, tokens: int) -> None:
        for layer in range(LAYERS):
            k = torch.randn(rows, HEADS, tokens, DIM, generator=gen)
            out_k, out_v = grown.update(k, k * 2, layer)
            ref_k, ref_v = plain.update(k, k * 2, layer)
            assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)

    append(3, 7)  # a prefill
    first = grown.layers[0].keys.data_ptr()
    for _ in range(20):  # decode steps: no copy of what is there
        append(3, 1)
    assert grown.layers[0].keys.data_ptr() == first
    assert grown.layers[0].keys.shape[2] == 27
    for cache in (grown, plain):
        kv_cache.select_rows(cache, torch.tensor([2, 0]))
        kv_cache.trim_left(cache, 3)
    append(2, 1)
    other, _ = cache_of(1, 30, 6)
    other_plain, _ = cache_of(1, 30, 6)
    kv_cache.merge_left_padded(grown, 25, other, 30)
    kv_cache.merge_left_padded(plain, 25, other_plain, 30)
    append(3, 1)
    for _ in range(80):  # past the spare columns: a larger buffer, same contents
        append(3, 1)
    for a, b in zip(grown.layers, plain.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert kv_cache.mergeable(grown)


def test_growing_layers_keep_rows_in_place_and_split_off_copies() -> None:
    """Rows leaving a growing cache move down within its buffer (no new buffer: the next append
    is still in place); a split copies the chosen rows into a cache of their own; both equal the
    concatenating cache's rows."""
    gen = torch.Generator().manual_seed(7)
    grown = DynamicCache()
    grown.layers = [kv_cache.GrowingLayer() for _ in range(LAYERS)]
    plain = DynamicCache()

    def append(rows: int, tokens: int, caches: tuple[DynamicCache, DynamicCache]) -> None:
        for layer in range(LAYERS):
            k = torch.randn(rows, HEADS, tokens, DIM, generator=gen)
            out_k, _ = caches[0].update(k, k * 2, layer)
            ref_k, _ = caches[1].update(k, k * 2, layer)
            assert torch.equal(out_k, ref_k)

    append(6, 5, (grown, plain))
    append(6, 1, (grown, plain))
    split = kv_cache.split_rows(grown, torch.tensor([1, 4]))
    split_plain = kv_cache.split_rows(plain, torch.tensor([1, 4]))
    buffer = grown.layers[0]._k_base.data_ptr()  # type: ignore[attr-defined]
    for cache in (grown, plain):
        kv_cache.select_rows(cache, torch.tensor([0, 2, 3, 5]))
    assert grown.layers[0]._k_base.data_ptr() == buffer  # type: ignore[attr-defined]
    view = grown.layers[0].keys.data_ptr()
    append(4, 1, (grown, plain))
    assert grown.layers[0].keys.data_ptr() == view  # appended in place after the move
    append(2, 1, (split, split_plain))
    pairs = [*zip(grown.layers, plain.layers, strict=True)]
    pairs += zip(split.layers, split_plain.layers, strict=True)
    for a, b in pairs:
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    kv_cache.select_rows(grown, torch.tensor([3, 0]))  # another order: a copy, still right
    kv_cache.select_rows(plain, torch.tensor([3, 0]))
    append(2, 1, (grown, plain))
    for a, b in zip(grown.layers, plain.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # a shorter batch joins into the spare rows, in place, padded on its left
    buffer = grown.layers[0]._k_base.data_ptr()  # type: ignore[attr-defined]  # (made anew above)
    other, _ = cache_of(1, 3, 8)
    other_plain, _ = cache_of(1, 3, 8)
    width = grown.layers[0].keys.shape[2] + 1  # (a batch's mask has the next token's column too)
    kv_cache.merge_left_padded(grown, width, other, 4)
    kv_cache.merge_left_padded(plain, width, other_plain, 4)
    assert grown.layers[0]._k_base.data_ptr() == buffer  # type: ignore[attr-defined]
    assert grown.layers[0].keys is grown.layers[0]._k_view  # type: ignore[attr-defined]  # (its own view)
    view = grown.layers[0].keys.data_ptr()
    append(3, 1, (grown, plain))
    assert grown.layers[0].keys.data_ptr() == view  # and the next step appends in place
    for a, b in zip(grown.layers, plain.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_split_of_consecutive_rows_takes_views_and_the_rest_moves_out() -> None:
    """Setting aside a tenant's last-admitted rows (consecutive): the split cache's rows are views
    of the buffer (no copy), the cache that keeps the others leaves that buffer (its appends never
    write into the split rows), the first rows of a cache without a buffer are kept as a view, and
    every row equals the concatenating cache's through appends on both sides."""
    gen = torch.Generator().manual_seed(11)
    grown = DynamicCache()
    grown.layers = [kv_cache.GrowingLayer() for _ in range(LAYERS)]
    plain = DynamicCache()

    def append(rows: int, caches: tuple[DynamicCache, DynamicCache]) -> None:
        for layer in range(LAYERS):
            k = torch.randn(rows, HEADS, 1, DIM, generator=gen)
            out_k, _ = caches[0].update(k, k * 2, layer)
            ref_k, _ = caches[1].update(k, k * 2, layer)
            assert torch.equal(out_k, ref_k)

    for _ in range(4):
        append(7, (grown, plain))
    buffer = grown.layers[0]._k_base  # type: ignore[attr-defined]
    split = kv_cache.split_rows(grown, torch.tensor([2, 3, 4, 5]))
    split_plain = kv_cache.split_rows(plain, torch.tensor([2, 3, 4, 5]))
    assert split.layers[0].keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    for cache in (grown, plain):
        kv_cache.select_rows(cache, torch.tensor([0, 1, 6]))
    for _ in range(3):  # the rows kept go on in a buffer of their own
        append(3, (grown, plain))
    assert grown.layers[0]._k_base.data_ptr() != buffer.data_ptr()  # type: ignore[attr-defined]
    for cache in (split, split_plain):  # the first three of the split rows: a view, no copy
        kv_cache.select_rows(cache, torch.tensor([0, 1, 2]))
    assert split.layers[0].keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    append(3, (split, split_plain))
    for a, b in [
        *zip(grown.layers, plain.layers, strict=True),
        *zip(split.layers, split_plain.layers, strict=True),
    ]:
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_cache_started_from_prefixes_copies_each_layer_when_it_is_first_read() -> None:
    """``prefilled``: each row's pieces at the right end of the columns, zeros on their left, as a
    concatenation would give; a layer's copy is made at its first read (its attention), and its
    length is known before."""
    config = LlamaConfig(
        hidden_size=HEADS * DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
    )
    gen = torch.Generator().manual_seed(8)
    pieces = [torch.randn(LAYERS, 2, HEADS, n, DIM, generator=gen) for n in (5, 3, 6)]
    parts = [[pieces[0], pieces[1]], [], [pieces[2][:, :, :, :4]]]  # a two-piece hit, a miss, a partial one
    cache = kv_cache.prefilled(config, parts, 8)
    first, second = cache.layers
    assert isinstance(first, kv_cache.GrowingLayer) and isinstance(second, kv_cache.GrowingLayer)
    assert first.get_seq_length() == 8 and first._pending is not None and second._pending is not None
    keys, values = first.keys, first.values
    assert keys is not None and values is not None
    assert first._pending is None and second._pending is not None  # only the layer read
    for layer in range(LAYERS):
        want = [
            torch.cat([pieces[0][layer], pieces[1][layer]], dim=2),
            torch.zeros(2, HEADS, 8, DIM),
            torch.cat([torch.zeros(2, HEADS, 4, DIM), pieces[2][layer, :, :, :4]], dim=2),
        ]
        got = cache.layers[layer]
        assert torch.equal(got.keys, torch.stack([w[0] for w in want]))
        assert torch.equal(got.values, torch.stack([w[1] for w in want]))
    k = torch.randn(3, HEADS, 1, DIM, generator=gen)  # and it grows in place from there
    out_k, _ = cache.update(k, k, 0)
    assert torch.equal(out_k[:, :, :8], keys) and torch.equal(out_k[:, :, 8:], k)
