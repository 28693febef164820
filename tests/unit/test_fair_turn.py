"""Who joins the generation batch under fair scheduling (app/engine/generation_lane.py:
``fair_turn``): pure logic, no model."""

from __future__ import annotations

from app.engine.generation_lane import fair_turn, headroom, row_shares

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
