"""The prefix cache: keys and values of token prefixes already computed, kept across requests.

A chatbot resends its whole conversation at every turn; with this cache only the new part is
prefilled. Each adapter version (LoRA, bottleneck, a merged composition), and the bare base, has a
tree of its own: an adapter changes the keys and values of every layer after the first adapted one,
so a prefix computed under one version is worth nothing to another, and a replaced or deleted
version's tree is dropped with it (:meth:`PrefixCache.drop`). The bare base's prefixes are shared by
all its requests.

**A radix tree per version.** Each edge holds a run of tokens and their keys and values, one tensor
``[layers, 2, heads, tokens, head_dim]``; a lookup walks the tree along a prompt's tokens and may end
inside an edge (a conversation's next turn shares the previous turn's prompt and answer, and then
diverges anywhere). Chosen over vLLM's hashed fixed-size blocks because the engine's batches are
contiguous tensors, not pages: a hit is copied into the new batch's cache in any case, so blocks
would only round every hit down to a block boundary (on average half a block of tokens prefilled
again) and hash every block of every prompt; the tree matches to the token and stores a turn once,
only what it adds to the conversation.

**Memory.** A token costs ``layers × 2 × kv_heads × head_dim`` values of the engine's cache dtype
(the default base in float32: 30 × 2 × 3 × 64 × 4 B = 46 KB; 23 KB where the native step keeps
bf16 keys and values). The cache holds at most ``budget`` bytes;
beyond it the least recently used leaves go first (a shared system prompt, the trunk of many
conversations, stays while any of them is used). Every read and write happens on the engine thread
(one writer), and a hit is copied into its batch when the batch starts, so no prefix in use can be
evicted under it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.metrics import Metrics

Key = int | None  # an adapter version's uid (a composition's too), None: the bare base
KV = torch.Tensor  # [layers, 2, heads, tokens, head_dim]
TOKEN_DIM = 3


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]  # the edge from the parent
    kv: KV | None  # its keys and values (None: a root)
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)  # first token -> child
    used: int = 0  # the tick of its last use (LRU)

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _first(pieces: list[KV], tokens: int) -> list[KV]:
    """The first ``tokens`` tokens of ``pieces`` (views, in order)."""
    out: list[KV] = []
    for piece in pieces:
        if tokens <= 0:
            break
        out.append(piece[:, :, :, :tokens])
        tokens -= piece.shape[TOKEN_DIM]
    return out


@dataclass
class Stats:
    queries: int = 0  # lookups
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, reused (counted by the engine: a batch may use fewer than found)
    evictions: int = 0  # leaves dropped for room


class PrefixCache:
    """Radix trees of computed prefixes per adapter version, within a byte budget (LRU leaves)."""

    def __init__(self, budget: int, dtype: torch.dtype | None = None) -> None:
        self.budget = budget
        self.dtype = dtype  # what prefixes are kept in (None: as computed; bf16: the engine's caches' dtype)
        self.bytes = 0
        self.stats = Stats()
        self._reported = Stats()
        self._roots: dict[Key, _Node] = {}
        self._dropped: set[Key] = set()  # retired versions: never cached again
        self._tick = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def _walk(self, key: Key, ids: Sequence[int]) -> tuple[int, list[tuple[_Node, int]]]:
        """How many leading ``ids`` the tree of ``key`` holds, and the edges along them (each with
        the tokens of it used)."""
        node = self._roots.get(key)
        path: list[tuple[_Node, int]] = []
        done = 0
        while node is not None and done < len(ids):
            child = node.children.get(ids[done])
            if child is None:
                break
            n = _common(child.tokens, ids[done:])
            path.append((child, n))
            done += n
            if n < len(child.tokens):
                break
            node = child
        return done, path

    def lookup(self, key: Key, ids: Sequence[int], limit: int) -> tuple[int, KV | None]:
        """The longest cached prefix of ``ids[:limit]``: its length and its keys and values (a
        copy, ``[layers, 2, heads, length, head_dim]``), or 0 and None."""
        done, pieces = self.pieces(key, ids, limit)
        return done, (torch.cat(pieces, dim=TOKEN_DIM) if pieces else None)

    def pieces(self, key: Key, ids: Sequence[int], limit: int) -> tuple[int, list[KV]]:
        """The longest cached prefix of ``ids[:limit]``: its length and its keys and values as
        views of the tree's edges, in order (no copy: read them before the tree changes)."""
        self.stats.queries += 1
        self.stats.query_tokens += len(ids)
        if not self.enabled or limit <= 0:
            return 0, []
        done, path = self._walk(key, ids[:limit])
        if not done:
            return 0, []
        tick = next(self._tick)
        for node, _ in path:
            node.used = tick
        return done, [node.kv[:, :, :, :n] for node, n in path if node.kv is not None]

    def cached_tokens(self, key: Key, ids: Sequence[int]) -> int:
        """How many of ``ids`` a prefill would take from the cache (all but the last token at most;
        nothing is counted or touched)."""
        return self._walk(key, ids[: len(ids) - 1])[0] if self.enabled else 0

    def reuse(self, rows: list[tuple[Key, list[int]]]) -> tuple[list[list[KV]], list[int], int]:
        """What a new prefill of ``rows`` (each its key and prompt) takes from the cache: per row
        its cached tokens' keys and values (views of the tree's edges, in order; none for a miss)
        and their count, and the columns they fill.

        Each row looks up the longest cached prefix of its prompt (all but the last token, whose
        logits the prefill computes). The rows are right-aligned and the prefill computes the last
        ``N`` columns, ``N`` the longest uncached part of any row; a row whose hit reaches into those
        columns computes those tokens again. So the batch's cache starts with ``width - N`` columns:
        each row's first ``len(prompt) - N`` tokens (rows with and without a hit in one prefill)."""
        if not self.enabled or not rows:
            return [[] for _ in rows], [0] * len(rows), 0
        found = [self.pieces(key, ids, len(ids) - 1) for key, ids in rows]
        lengths = [len(ids) for _, ids in rows]
        window = max(n - hit for n, (hit, _) in zip(lengths, found, strict=True))
        columns = max(lengths) - window
        if columns <= 0:
            return [[] for _ in rows], [0] * len(rows), 0
        cached = [max(0, n - window) for n in lengths]
        self.stats.hit_tokens += sum(cached)
        parts = [_first(pieces, c) for (_, pieces), c in zip(found, cached, strict=True)]
        return parts, cached, columns

    def insert(self, key: Key, ids: Sequence[int], kv_of: Callable[[int, int], KV]) -> int:
        """Cache the prefix ``ids`` under ``key``: ``kv_of(start, end)`` gives the keys and values
        of ``ids[start:end]``, asked only for what the tree does not hold yet. Returns the tokens
        added (none when one sequence alone would not fit the budget)."""
        if not self.enabled or not ids or key in self._dropped:
            return 0
        root = self._roots.get(key)
        if root is None:
            root = self._roots[key] = _Node((), None)
        done, path = self._walk(key, ids)
        tick = next(self._tick)
        for node, _ in path:
            node.used = tick
        if done == len(ids):
            return 0
        parent = root
        if path:
            last, n = path[-1]
            parent = self._split(last, n) if n < len(last.tokens) else last
        kv = kv_of(done, len(ids))
        if self.dtype is not None:
            kv = kv.to(self.dtype)
        size = kv.numel() * kv.element_size()
        if size > self.budget:
            return 0
        leaf = _Node(tuple(ids[done:]), kv.contiguous(), parent, used=tick)
        parent.children[leaf.tokens[0]] = leaf
        self.bytes += size
        self._evict(keep=leaf)
        return len(leaf.tokens)

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut ``node``'s edge after ``n`` tokens; return the new upper part (its parent now)."""
        assert node.parent is not None and node.kv is not None and 0 < n < len(node.tokens)
        upper = _Node(node.tokens[:n], node.kv[:, :, :, :n].clone(), node.parent, used=node.used)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.kv, node.parent = node.tokens[n:], node.kv[:, :, :, n:].clone(), upper
        upper.children[node.tokens[0]] = node
        return upper

    def _leaves(self) -> list[_Node]:
        out: list[_Node] = []
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out

    def _evict(self, keep: _Node | None = None) -> None:
        """Drop least recently used leaves until the cache is within its budget (``keep`` last)."""
        while self.bytes > self.budget:
            leaves = self._leaves()
            if not leaves:
                break
            self._remove(min(leaves, key=lambda leaf: (leaf is keep, leaf.used)))
            self.stats.evictions += 1

    def _remove(self, node: _Node) -> None:
        assert node.parent is not None
        del node.parent.children[node.tokens[0]]
        self.bytes -= node.nbytes
        parent = node.parent
        node.parent = None
        if parent.kv is None and not parent.children:  # an empty tree
            self._roots = {k: r for k, r in self._roots.items() if r is not parent}

    def drop(self, key: Key) -> None:
        """Forget every prefix of ``key`` (a retired adapter version: its work still running
        caches nothing more)."""
        if key is not None:
            self._dropped.add(key)
        root = self._roots.pop(key, None)
        if root is None:
            return
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            self.bytes -= node.nbytes
            stack.extend(node.children.values())

    def report(self, metrics: Metrics) -> None:
        """Add what happened since the last report to the Prometheus series."""
        now, last = self.stats, self._reported
        metrics.prefix_cache_queries.inc(now.queries - last.queries)
        metrics.prefix_cache_query_tokens.inc(now.query_tokens - last.query_tokens)
        metrics.prefix_cache_hit_tokens.inc(now.hit_tokens - last.hit_tokens)
        metrics.prefix_cache_evictions.inc(now.evictions - last.evictions)
        metrics.prefix_cache_bytes.set(self.bytes)
        self._reported = dataclasses.replace(now)

    def tokens(self, key: Key) -> int:
        """Tokens cached under ``key`` (for tests and reports)."""
        root = self._roots.get(key)
        stack = list(root.children.values()) if root is not None else []
        total = 0
        while stack:
            node = stack.pop()
            total += len(node.tokens)
            stack.extend(node.children.values())
        return total
