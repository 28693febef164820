"""Who joins the generation batch under fair scheduling (app/engine/row_shares.py:
``fair_turn``): pure logic, no model."""

from __future__ import annotations

from app.engine.row_shares import (
    fair_turn,
    headroom,
    light,
    light_tenants,
    row_shares,
    rows_to_bring_back,
    rows_to_set_aside,
    step_shares,
)
from app.engine.step_costs import StepCosts

LIMIT = 32


def turn(tenant: str, by_tenant: dict[str, int], waiting: dict[str, float], need: int = 1) -> str:
    shares = row_shares(by_tenant, waiting, LIMIT)
    return fair_turn(tenant, need, by_tenant, shares, sum(by_tenant.values()), LIMIT)


def test_anyone_joins_while_the_batch_is_below_three_quarters() -> None:
    assert headroom(LIMIT) == 8
    assert turn("flood", {"flood": 22, "quiet": 1}, {"flood": 1.0}) == "join"


def test_a_lone_tenant_fills_the_batch_and_no_more() -> None:
    assert turn("flood", {"flood": 31}, {"flood": 1.0}) == "join"
    assert turn("flood", {"flood": 32}, {"flood": 1.0}) == "wait"


def test_a_tenant_below_its_share_joins_a_full_batch_up_to_the_headroom() -> None:
    assert turn("quiet", {"flood": 32}, {"quiet": 1.0, "flood": 1.0}) == "join"
    assert turn("quiet", {"flood": 32, "quiet": 7}, {"quiet": 1.0, "flood": 1.0}) == "join"
    assert turn("quiet", {"flood": 32, "quiet": 8}, {"quiet": 1.0, "flood": 1.0}) == "stop"


def test_a_heavy_tenant_waits_while_a_light_one_decodes() -> None:
    # the flood is over its share (16 of 32) and the quiet tenant, below its own, has a row
    assert turn("flood", {"flood": 25, "quiet": 1}, {"flood": 1.0}) == "wait"
    # ... but not beyond a quarter of the batch: below three quarters it joins again
    assert turn("flood", {"flood": 22, "quiet": 1}, {"flood": 1.0}) == "join"
    # with no other tenant in the batch it refills as before
    assert turn("flood", {"flood": 25}, {"flood": 1.0, "quiet": 1.0}) == "join"


def test_weights_set_the_shares() -> None:
    # gold (weight 3) has 20 of its 24 rows: it joins; bronze (weight 1) is over its 8
    by = {"gold": 20, "bronze": 9}
    waiting = {"gold": 3.0, "bronze": 1.0}
    assert turn("gold", by, waiting) == "join"
    assert turn("bronze", by, waiting) == "wait"


def owners(*groups: tuple[str, int, int]) -> list[tuple[str, int]]:
    """Rows in admission order: (tenant, first request id, requests of one row each)."""
    return [(tenant, first + i) for tenant, first, n in groups for i in range(n)]


def test_a_light_tenant_has_the_heavy_one_set_aside_down_to_its_share() -> None:
    rows = owners(("flood", 0, 20), ("quiet", 100, 1), ("flood", 20, 11))
    shares = row_shares({}, {"flood": 1.0, "quiet": 1.0}, LIMIT)
    assert light(rows, shares)
    aside = rows_to_set_aside(rows, shares, headroom(LIMIT))
    # the 15 last-admitted flood requests (of 31, share 16); the quiet row stays
    assert len(aside) == 15 and 20 not in aside
    assert aside == list(range(16, 20)) + list(range(21, 32))


def test_nothing_is_set_aside_without_a_light_tenant_or_for_a_few_rows() -> None:
    shares = row_shares({}, {"a": 1.0, "b": 1.0}, LIMIT)
    assert rows_to_set_aside(owners(("a", 0, 32)), row_shares({}, {"a": 1.0}, LIMIT), 8) == []
    assert rows_to_set_aside(owners(("a", 0, 15), ("b", 50, 17)), shares, 8) == []  # none light
    assert rows_to_set_aside(owners(("a", 0, 20), ("b", 50, 1)), shares, 8) == []  # 4 over: too few


def test_an_ensemble_is_set_aside_whole() -> None:
    # request 7 of tenant a is an ensemble of 3 rows, admitted last
    rows = owners(("a", 0, 20)) + [("a", 7_000)] * 3 + owners(("b", 50, 1))
    aside = rows_to_set_aside(rows, row_shares({}, {"a": 1.0, "b": 1.0}, LIMIT), 4)
    assert {20, 21, 22} <= set(aside) and len(aside) == 7  # 23 rows down to 16: the ensemble and 4 more


def test_a_tenant_set_aside_gets_its_rows_back_up_to_its_share_while_the_light_one_decodes() -> None:
    shares = row_shares({}, {"flood": 1.0, "quiet": 1.0}, LIMIT)  # 16 each
    parked = owners(("flood", 20, 8)) + [("flood", 7_000)] * 2 + owners(("flood", 30, 2))
    # 3 of flood's 16 finished: not yet (each return copies rows' cache)
    assert rows_to_bring_back(owners(("flood", 0, 13), ("quiet", 100, 1)), parked, shares) == []
    # half of them finished: its last set-aside requests, the ensemble whole, up to its share
    assert rows_to_bring_back(owners(("flood", 0, 8), ("quiet", 100, 1)), parked, shares) == list(
        range(4, 12)
    )
    # the ensemble would go beyond its share: the requests after it only
    wide = [("flood", 7_000)] * 16 + owners(("flood", 20, 2))
    assert rows_to_bring_back(owners(("flood", 0, 3), ("quiet", 100, 1)), wide, shares) == [16, 17]
    assert rows_to_bring_back(owners(("flood", 0, 16), ("quiet", 100, 1)), parked, shares) == []


def test_a_step_limit_holds_the_heavy_tenants_to_what_is_left_by_their_shares() -> None:
    rows = owners(("flood", 0, 24), ("batch", 50, 6), ("quiet", 100, 1))
    shares = row_shares({}, {"flood": 2.0, "batch": 1.0, "quiet": 1.0}, LIMIT)  # 16, 8, 8
    limits = step_shares(rows, shares, 10, light_tenants(rows, shares))
    # quiet (1 of 8) is light and keeps its share; 9 rows left: flood 6, batch 3
    assert limits == {"flood": 6.0, "batch": 3.0, "quiet": 8.0}
    aside = rows_to_set_aside(rows, shares, 8, limits)
    assert aside == [*range(6, 24), 27, 28, 29]  # the last-admitted over each limit
    # a step limit above the shares changes nothing
    assert step_shares(rows, shares, LIMIT * 2, light_tenants(rows, shares)) == shares


def test_step_costs_fit_a_line_and_give_the_rows_within_a_slowdown() -> None:
    costs = StepCosts()
    assert costs.rows_within(2.0, 1, LIMIT) == LIMIT  # nothing measured yet
    for rows in (1, 8, 32):
        for _ in range(3):
            costs.record(rows, 0.005 + 0.001 * rows)
    a, b = costs.line() or (0.0, 0.0)
    assert abs(a - 0.005) < 1e-9 and abs(b - 0.001) < 1e-9
    # 2 x (5 + 1) ms = 12 ms: 7 rows
    assert costs.rows_within(2.0, 1, LIMIT) == 7
    assert costs.rows_within(1.0, 3, LIMIT) == 3
    assert costs.rows_within(100.0, 1, LIMIT) == LIMIT
    flat = StepCosts()  # steps that cost the same at any rows (a GPU): no limit
    flat.record(1, 0.01)
    flat.record(32, 0.01)
    assert flat.rows_within(2.0, 1, LIMIT) == LIMIT
