"""Fair admission (app/engine/fair_queue.py): pure logic, no model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from app.engine.fair_queue import FairQueue
from app.engine.types import Flow


@dataclass(eq=False)
class Job:
    name: str
    flow: Flow
    cost: int = 10


def job(name: str, tenant: str = "a", adapter: str = "", cost: int = 10, **flow: float) -> Job:
    return Job(name, Flow(tenant=tenant, adapter=adapter, **flow), cost)  # type: ignore[arg-type]


def drain(q: FairQueue[Job]) -> list[str]:
    return [q.pop().name for _ in range(len(q))]


def test_one_flow_is_first_come_first_served() -> None:
    q: FairQueue[Job] = FairQueue()
    q.extend(job(str(i)) for i in range(5))
    assert [j.name for j in q] == ["0", "1", "2", "3", "4"]
    assert q.peek() is not None and q.peek().name == "0"  # type: ignore[union-attr]
    assert drain(q) == ["0", "1", "2", "3", "4"] and not q


def test_a_new_tenant_is_served_next_behind_a_flood() -> None:
    q: FairQueue[Job] = FairQueue()
    q.extend(job(f"flood{i}", "flood", cost=112) for i in range(100))
    for _ in range(10):  # the flood has been served a while
        q.pop()
    q.append(job("quiet", "quiet", cost=20))
    assert q.pop().name == "quiet"


def test_first_come_first_served_keeps_arrival_order_across_tenants() -> None:
    q: FairQueue[Job] = FairQueue(fair=False)
    q.extend(job(f"flood{i}", "flood") for i in range(20))
    q.append(job("quiet", "quiet"))
    assert drain(q)[-1] == "quiet"


def test_backlogged_tenants_share_by_weight() -> None:
    q: FairQueue[Job] = FairQueue()
    q.extend(job(f"h{i}", "heavy", weight=2.0) for i in range(300))
    q.extend(job(f"l{i}", "light", weight=1.0) for i in range(300))
    served = Counter(q.pop().flow.tenant for _ in range(150))
    assert served["heavy"] == 100 and served["light"] == 50


def test_shares_are_in_tokens_not_requests() -> None:
    q: FairQueue[Job] = FairQueue()
    q.extend(job(f"long{i}", "long", cost=100) for i in range(50))
    q.extend(job(f"short{i}", "short", cost=10) for i in range(50))
    served = Counter(q.pop().flow.tenant for _ in range(44))
    assert served["short"] == 40 and served["long"] == 4  # equal tokens: 400 each


def test_a_tenants_adapters_take_turns() -> None:
    q: FairQueue[Job] = FairQueue()
    q.extend(job(f"x{i}", adapter="x") for i in range(6))
    q.extend(job(f"y{i}", adapter="y") for i in range(2))
    q.append(job("base0", adapter=""))
    assert drain(q)[:6] == ["x0", "y0", "base0", "x1", "y1", "x2"]


def test_priority_orders_work_within_a_tenant_and_adapter() -> None:
    q: FairQueue[Job] = FairQueue()
    q.append(job("late", priority=5))
    q.append(job("normal"))
    q.append(job("urgent", priority=-1))
    assert drain(q) == ["urgent", "normal", "late"]
    q = FairQueue(fair=False)  # first come, first served ignores it
    q.extend([job("late", priority=5), job("urgent", priority=-1)])
    assert drain(q) == ["late", "urgent"]


def test_an_idle_tenant_banks_no_credit() -> None:
    q: FairQueue[Job] = FairQueue()
    q.extend(job(f"b{i}", "busy") for i in range(100))
    for _ in range(50):  # "idle" sends nothing meanwhile
        q.pop()
    q.extend(job(f"i{i}", "idle") for i in range(50))
    first = [q.pop().flow.tenant for _ in range(10)]
    assert first.count("idle") in (5, 6)  # alternating from now on, not 50 in a row


def test_removed_and_taken_work_is_reported_once() -> None:
    left: list[str] = []
    q: FairQueue[Job] = FairQueue(on_leave=lambda j: left.append(j.name))
    q.extend(job(str(i), tenant=f"t{i % 2}") for i in range(6))
    assert q.waiting("t0") == 3
    q.pop()
    assert [j.name for j in q.remove_if(lambda j: j.name in {"3", "4"})] == ["3", "4"]
    assert len(q) == 3 and q.waiting("t1") == 2 and q.waiting("t0") == 1
    q.clear()
    assert sorted(left) == ["0", "1", "2", "3", "4", "5"] and not q and q.peek() is None
