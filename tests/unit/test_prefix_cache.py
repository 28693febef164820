"""The prefix cache's radix trees (app/engine/prefix_cache.py): pure logic on random tensors."""

from __future__ import annotations

import torch

from app.engine.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 3, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4


def kv_for(ids: list[int]) -> torch.Tensor:
    """Keys and values that name their token: every value of token t's column is t (and -t)."""
    t = torch.tensor(ids, dtype=torch.float32).view(1, 1, 1, -1, 1)
    return torch.cat([t, -t], dim=1).expand(LAYERS, 2, HEADS, len(ids), DIM).clone()


def insert(
    cache: PrefixCache, key: int | None, ids: list[int], asked: list[tuple[int, int]] | None = None
) -> int:
    def kv_of(start: int, end: int) -> torch.Tensor:
        if asked is not None:
            asked.append((start, end))
        return kv_for(ids[start:end])

    return cache.insert(key, ids, kv_of)


def test_the_longest_prefix_is_found_to_the_token_and_only_new_tokens_are_stored() -> None:
    cache = PrefixCache(1 << 30)
    asked: list[tuple[int, int]] = []
    assert insert(cache, None, [1, 2, 3, 4, 5], asked) == 5
    assert insert(cache, None, [1, 2, 3, 9, 9, 9], asked) == 3  # shares 3 tokens: splits the edge
    assert asked == [(0, 5), (3, 6)]
    assert cache.bytes == 8 * TOKEN_BYTES and cache.tokens(None) == 8
    n, kv = cache.lookup(None, [1, 2, 3, 4, 7], limit=5)
    assert n == 4 and kv is not None and torch.equal(kv, kv_for([1, 2, 3, 4]))
    n, kv = cache.lookup(None, [1, 2, 3, 9, 9, 9, 9], limit=6)
    assert n == 6 and kv is not None and torch.equal(kv, kv_for([1, 2, 3, 9, 9, 9]))
    assert cache.lookup(None, [1, 2, 3, 4, 5], limit=2)[0] == 2  # never past the limit
    assert cache.lookup(None, [5, 1], limit=2) == (0, None)
    assert insert(cache, None, [1, 2]) == 0  # already held
    assert cache.stats.queries == 4 and cache.stats.query_tokens == 19


def test_each_adapter_version_has_its_own_tree_and_a_dropped_one_is_gone() -> None:
    cache = PrefixCache(1 << 30)
    insert(cache, 7, [1, 2, 3])
    insert(cache, None, [1, 2, 3, 4])
    assert cache.lookup(8, [1, 2, 3], limit=3)[0] == 0  # another version: nothing
    assert cache.lookup(7, [1, 2, 3], limit=3)[0] == 3
    cache.drop(7)
    assert cache.lookup(7, [1, 2, 3], limit=3)[0] == 0
    assert cache.bytes == 4 * TOKEN_BYTES and cache.lookup(None, [1, 2, 3], limit=3)[0] == 3


def test_least_recently_used_leaves_go_first_within_the_budget() -> None:
    cache = PrefixCache(10 * TOKEN_BYTES)
    insert(cache, None, [1, 2, 3, 4])  # trunk [1, 2] with two branches after the next insert
    insert(cache, None, [1, 2, 7, 8])
    cache.lookup(None, [1, 2, 3, 4], limit=4)  # the first branch is now the more recent
    insert(cache, None, [5, 5, 5, 5])  # 10 tokens: fits
    assert cache.bytes == 10 * TOKEN_BYTES and cache.stats.evictions == 0
    insert(cache, None, [6, 6])  # over by 2: the least recently used leaf ([7, 8]) goes
    assert cache.stats.evictions == 1 and cache.bytes <= 10 * TOKEN_BYTES
    assert cache.lookup(None, [1, 2, 7, 8], limit=4)[0] == 2
    assert cache.lookup(None, [1, 2, 3, 4], limit=4)[0] == 4
    assert insert(cache, None, list(range(100, 111))) == 0  # alone larger than the budget
    tiny = PrefixCache(3 * TOKEN_BYTES)
    insert(tiny, None, [1, 2, 3])
    insert(tiny, None, [4, 5, 6])  # the new one stays, the old one goes
    assert tiny.lookup(None, [4, 5, 6], limit=3)[0] == 3 and tiny.lookup(None, [1], limit=1)[0] == 0
    assert tiny.bytes == 3 * TOKEN_BYTES


def test_a_zero_budget_turns_it_off() -> None:
    cache = PrefixCache(0)
    assert not cache.enabled and insert(cache, None, [1, 2]) == 0
    assert cache.lookup(None, [1, 2], limit=2) == (0, None) and cache.bytes == 0
