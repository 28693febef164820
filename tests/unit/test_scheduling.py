"""The lanes' scheduling rules with a recording runner and toy slot banks (no model)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from app.adapters.version import AdapterVersion
from app.config import Settings
from app.engine.classification_lane import ClassificationLane, fits
from app.engine.generation_lane import prefill_fits
from app.engine.runner import ForwardHealth, Row
from app.engine.slots import Admission, DeviceSlots
from app.engine.types import ClassifyWork
from app.errors import DeadlineExceeded
from app.metrics import Metrics
from app.models.multi_lora import RoutingContext, wrap_linear_layers
from tests.unit.test_layers import Toy, lora


class RecordingRunner:
    """Stands in for the model runner: records each batch's (slot, tokens) rows."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, list[int]]]] = []
        self.health = ForwardHealth(3, torch.device("cpu"))

    def classify(self, rows: list[Row], heads: Any) -> list[list[float]]:
        self.batches.append([(r.slot, r.ids) for r in rows])
        return [[float(r.slot), float(len(r.ids))] for r in rows]


def test_batch_budget_rule() -> None:
    assert fits(0, 0, 4, 10, max_rows=4, max_tokens=40)
    assert not fits(0, 0, 5, 10, max_rows=4, max_tokens=100)  # rows
    assert not fits(2, 10, 1, 20, max_rows=8, max_tokens=59)  # 3 rows padded to 20
    assert fits(2, 10, 1, 20, max_rows=8, max_tokens=60)
    assert prefill_fits([], 5000, 0, max_tokens=100)  # the first prompt always goes
    assert not prefill_fits([(60, 0)], 10, 0, max_tokens=100)
    assert prefill_fits([(50, 0)], 10, 0, max_tokens=100)


def test_a_prefill_counts_only_uncached_tokens_and_keeps_cached_turns_from_recomputing() -> None:
    turn = (1000, 990)  # a conversation's next turn: 990 of its 1,000 tokens cached
    assert prefill_fits([turn] * 4, 20, 0, max_tokens=100)  # 5 rows × 20 computed columns
    assert not prefill_fits([turn] * 4, 30, 0, max_tokens=100)  # 5 × 30
    # a long uncached prompt would make the turn compute 490 of its cached tokens again
    assert not prefill_fits([turn], 500, 0, max_tokens=4096)
    assert not prefill_fits([(500, 0)], *turn, max_tokens=4096)
    # a little padding or recomputing is cheaper than a forward of its own
    assert prefill_fits([turn], 60, 0, max_tokens=4096) and prefill_fits([(60, 0)], *turn, max_tokens=4096)
    assert prefill_fits([turn], 1000, 985, max_tokens=4096)  # two cached turns


def _lane(max_batch_size: int, max_batch_tokens: int) -> tuple[ClassificationLane, RecordingRunner]:
    runner = RecordingRunner()
    settings = Settings(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, device="cpu")
    return ClassificationLane(runner, settings, Metrics()), runner  # type: ignore[arg-type]


def _slots(capacity: int) -> DeviceSlots:
    return DeviceSlots(
        wrap_linear_layers(Toy(), RoutingContext()), capacity, torch.device("cpu"), torch.float32
    )


_ADAPTERS = {name: lora(seed, 2) for seed, name in enumerate("ab")}
_VERSIONS = {name: AdapterVersion.from_adapter(name, a) for name, a in _ADAPTERS.items()}


def _work(name: str, inputs: list[list[int]], deadline: float = float("inf")) -> ClassifyWork:
    return ClassifyWork(_VERSIONS[name], _ADAPTERS[name], inputs, deadline=deadline)


def test_a_step_takes_what_fits_the_budgets_in_fifo_order() -> None:
    lane, runner = _lane(max_batch_size=4, max_batch_tokens=64)
    works = [_work("a", [[1] * 8, [2] * 8]), _work("b", [[3] * 8]), _work("a", [[4] * 30])]
    lane.queue.extend(works)
    slots = _slots(4)
    lane.step(Admission(slots, set(), frozenset))
    assert [len(b) for b in runner.batches] == [3]  # the third would pad 4 rows to 30 tokens
    assert works[0].future.result() == [[1.0, 8.0], [1.0, 8.0]] and works[1].future.result() == [[2.0, 8.0]]
    lane.step(Admission(slots, set(), frozenset))
    assert works[2].future.result() == [[1.0, 30.0]] and not lane.busy()


def test_a_request_without_device_room_stops_the_batch_and_stays_first() -> None:
    lane, runner = _lane(max_batch_size=8, max_batch_tokens=1024)
    slots = _slots(1)
    first, second, third = _work("a", [[1]]), _work("b", [[2]]), _work("a", [[3]])
    lane.queue.extend([first, second, third])
    keep: set[int] = set()
    lane.step(Admission(slots, keep, frozenset))
    assert first.future.done() and not second.future.done() and list(lane.queue) == [second, third]
    assert len(runner.batches) == 1


def test_expired_requests_fail_with_504_and_the_rest_stay() -> None:
    lane, _ = _lane(max_batch_size=8, max_batch_tokens=1024)
    now = time.monotonic()
    late, on_time = _work("a", [[1]], deadline=now - 1), _work("a", [[1]], deadline=now + 60)
    lane.queue.extend([late, on_time])
    lane.expire(now)
    with pytest.raises(DeadlineExceeded):
        late.future.result()
    assert list(lane.queue) == [on_time]
