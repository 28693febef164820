"""The catalog's pure parts: finding lone surrogates in request JSON, checking a composition's
members, the merge cache's bookkeeping and the host tier's eviction (no model, no store)."""

from __future__ import annotations

from typing import Any

import pytest

from app.adapters.composition import MAX_MERGES, Composition, MergeCache, check_members
from app.adapters.control import DetachedEngine
from app.adapters.host_tier import HostTier
from app.adapters.methods import METHODS, is_combine, is_merge
from app.adapters.records import AdapterRecord, Held, Target
from app.errors import IncompatibleMembers, TaskMismatch
from app.metrics import Metrics
from app.protocol.strict import lone_surrogate


def _record(name: str, task: str = "classify", labels: tuple[str, ...] = ("a", "b"), size: int = 10) -> Any:
    summary = {
        "task": task,
        "kind": "lora",
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj"],
        "labels": list(labels) if task == "classify" else [],
        "num_params": 100,
        "size_bytes": size,
    }
    return AdapterRecord.of(name, 1, 0.0, summary)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("plain text", None),
        ("emoji \U0001f600 as a proper pair", None),
        ("a\ud800b", "@1"),
        ({"messages": [{"role": "user", "content": "ok"}, {"content": "x\udc00"}]}, "messages.1.content@1"),
        ({"schema": {"properties": {"\udbff": {}}}}, "schema.properties@0"),
        ({"\ud800": 1}, "@0"),
        ([1, 2.5, None, True, "fine"], None),
    ],
)
def test_lone_surrogates_are_found_with_their_path(value: Any, where: str | None) -> None:
    assert lone_surrogate(value) == where


def test_the_methods_have_one_definition() -> None:
    assert METHODS["classify"] == ("mean", "vote", "logits", "cat", "linear", "ties")
    assert METHODS["generate"] == ("average", "cat", "linear", "ties")
    assert is_merge("ties") and not is_merge("mean") and is_combine("vote") and not is_combine("cat")
    with pytest.raises(ValueError, match="unknown method"):
        Composition.from_record("x", {"members": [{"name": "a", "weight": 1}], "method": "median"})


def test_members_must_serve_one_task_with_one_label_set() -> None:
    a, b = _record("a"), _record("b")
    mean = Composition((("a", 1.0), ("b", 1.0)), "mean")
    assert check_members(mean, [a, b], "classify", ensemble_rows=8) == "classify"
    assert check_members(mean, [a, b], None, ensemble_rows=8) == "classify"
    with pytest.raises(TaskMismatch, match="adapter 'a' is a classify adapter; use /classify"):
        check_members(mean, [a, b], "generate", ensemble_rows=8)  # a request's own members: the odd one
    named = Composition((("a", 1.0), ("b", 1.0)), "mean", name="pair")
    with pytest.raises(TaskMismatch, match="'pair' is a classify composition"):
        check_members(named, [a, b], "generate", ensemble_rows=8)
    with pytest.raises(IncompatibleMembers, match="serve one task"):
        check_members(mean, [a, _record("g", "generate")], None, ensemble_rows=8)
    with pytest.raises(IncompatibleMembers, match="'average' does not combine classify"):
        check_members(Composition((("a", 1.0), ("b", 1.0)), "average"), [a, b], None, ensemble_rows=8)
    with pytest.raises(IncompatibleMembers, match="share one label set"):
        check_members(mean, [a, _record("c", labels=("a", "z"))], None, ensemble_rows=8)
    gens = [_record(f"g{i}", "generate") for i in range(3)]
    average = Composition(tuple((r.name, 1.0) for r in gens), "average")
    assert check_members(average, gens, "generate", ensemble_rows=3) == "generate"
    with pytest.raises(IncompatibleMembers, match="at most 2 members"):
        check_members(average, gens, "generate", ensemble_rows=2)


def test_a_target_is_the_base_one_adapter_or_an_ensemble() -> None:
    held = Held(_record("a"), weights=object())  # type: ignore[arg-type]
    assert Target(None).single is None and Target(None).members == ()
    assert Target("a", (held,)).single is held
    assert Target("a+b", (held, held), ensemble=True).single is None


def test_the_merge_cache_keeps_one_merge_per_composition_and_at_most_max_merges() -> None:
    metrics = Metrics()
    host = HostTier(1 << 30, metrics, lambda name: False)
    retired: list[int] = []
    cache = MergeCache(64, host, lambda version: retired.append(version.uid), metrics)
    first, second = _record("m"), _record("m")
    assert cache.put(("m", "cat", 1.0, ((1, 1.0),)), first) == []
    assert cache.put(("m", "cat", 1.0, ((2, 1.0),)), second) == [first]  # a member was replaced
    assert cache.get(("m", "cat", 1.0, ((1, 1.0),))) is None
    assert cache.get(("m", "cat", 1.0, ((2, 1.0),))) is second
    gone = []
    for i in range(MAX_MERGES):
        gone += cache.put((f"c{i}", "cat", 1.0, ()), _record(f"c{i}"))
    assert gone == [second]  # the least recently used beyond MAX_MERGES


def test_the_host_tier_evicts_least_recently_used_and_never_a_pinned_name() -> None:
    metrics = Metrics()
    pinned = {"p"}
    host = HostTier(30, metrics, lambda name: name in pinned)
    records = {n: _record(n, size=10) for n in ("p", "a", "b", "c")}
    for name in ("p", "a", "b"):
        host.add(records[name], object())  # type: ignore[arg-type]
    assert host.get(records["a"]) is not None  # a is now more recent than b
    host.add(records["c"], object())  # type: ignore[arg-type]
    assert {n for n, r in records.items() if r.uid in host} == {"p", "a", "c"}
    host.remove(records["a"])
    assert records["a"].uid not in host
    assert metrics.adapter_resident_bytes.labels(tier="host")._value.get() == 20


def test_a_detached_engine_holds_nothing() -> None:
    engine = DetachedEngine()
    engine.retire(_record("a").handle)
    assert engine.device_uids() == frozenset()
