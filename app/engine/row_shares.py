"""Fair scheduling's arithmetic over a generation batch's rows: each tenant's share of them, who
joins a batch, and which rows are set aside while a light tenant decodes (docs/tenants.md).
Pure functions of the rows' owners (each row's tenant and request) and the tenants' shares."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Literal


def headroom(max_batch_size: int) -> int:
    """Rows a full batch may still take for tenants below their share of it (fair scheduling)."""
    return max(1, max_batch_size // 4)


def row_shares(rows: dict[str, int], waiting: dict[str, float], max_rows: int) -> dict[str, float]:
    """Each active tenant's share of ``max_rows`` rows, by weight (``rows``: its rows in the batch;
    ``waiting``: the weights of the tenants with waiting work; running tenants count with weight 1
    unless they wait too)."""
    weights = {tenant: 1.0 for tenant in rows} | waiting
    total = sum(weights.values())
    return {tenant: max_rows * w / total for tenant, w in weights.items()}


def fair_turn(
    tenant: str, need: int, by_tenant: dict[str, int], shares: dict[str, float], taken: int, limit: int
) -> Literal["join", "wait", "stop"]:
    """Whether ``need`` rows of ``tenant`` join the batch under fair scheduling (``by_tenant``: each
    tenant's rows in the batches; ``taken``: all of them; ``shares``: :func:`row_shares`).

    Up to three quarters of ``limit`` anyone joins. Beyond, a tenant within its share joins (even
    a full batch, up to :func:`headroom` rows more: it does not wait for a flood's rows to end); a
    tenant over its share waits for room, and also while another tenant with rows in the batch is
    below its share: a light tenant's tokens are not slowed by a heavy one's prefills and wider
    steps, for at most a quarter of the batch's rows."""
    after = taken + need
    if after > limit + headroom(limit):
        return "stop"
    if after <= limit - headroom(limit):
        return "join"
    if by_tenant.get(tenant, 0) + need <= max(1.0, shares.get(tenant, 0.0)):
        return "join"
    if after > limit:
        return "wait"
    lighter = any(0 < n < shares.get(t, 0.0) for t, n in by_tenant.items() if t != tenant)
    return "wait" if lighter else "join"


def light(owners: list[tuple[str, int]], shares: dict[str, float]) -> bool:
    """Whether, of the tenants of the running rows (``owners``: each row's tenant and request),
    one is light: at or below half its share while another tenant has rows too."""
    counts = Counter(tenant for tenant, _ in owners)
    return len(counts) > 1 and any(n <= shares.get(t, 0.0) / 2 for t, n in counts.items())


def step_shares(
    owners: list[tuple[str, int]], shares: dict[str, float], most: int, lights: set[str]
) -> dict[str, float]:
    """The shares of a step's rows while light tenants decode (``lights``, :func:`light_tenants`),
    for a step of at most ``most`` rows (:class:`~app.engine.step_costs.StepCosts`): the light
    tenants keep theirs, the others split the rest by their shares, each within its own share."""
    counts = Counter(tenant for tenant, _ in owners)
    left = most - sum(counts[t] for t in lights)
    heavy = {t: s for t, s in shares.items() if t not in lights}
    total = sum(heavy.values()) or 1.0
    return shares | {t: min(s, max(1.0, left * s / total)) for t, s in heavy.items()}


def light_tenants(
    owners: list[tuple[str, int]], shares: dict[str, float], aside: Iterable[tuple[str, int]] = ()
) -> set[str]:
    """The tenants of the running rows (``owners``) at or below half their share, none of whose
    rows are set aside (``aside``)."""
    counts = Counter(tenant for tenant, _ in owners)
    held = {tenant for tenant, _ in aside}
    return {t for t, n in counts.items() if n <= shares.get(t, 0.0) / 2 and t not in held}


def rows_to_set_aside(
    owners: list[tuple[str, int]],
    shares: dict[str, float],
    least: int,
    limits: dict[str, float] | None = None,
) -> list[int]:
    """The rows to set aside while a light tenant decodes (:func:`light`): of each tenant over its
    limit (``limits``, :func:`step_shares`; else its share), its last-admitted whole requests (an
    ensemble's rows together) down to it, if that makes at least ``least`` rows (fewer are not
    worth the copy of their cache). The light tenant's tokens then cost a step of the limits' rows,
    not of the whole batch."""
    if not light(owners, shares):
        return []
    limits = shares if limits is None else limits
    chosen: list[int] = []
    for tenant, n in Counter(tenant for tenant, _ in owners).items():
        over = n - max(1, int(limits.get(tenant, 0.0)))
        for work in reversed(list(dict.fromkeys(w for t, w in owners if t == tenant))):
            if over <= 0:
                break
            rows = [i for i, (_, w) in enumerate(owners) if w == work]
            chosen += rows
            over -= len(rows)
    return sorted(chosen) if len(chosen) >= least else []


def rows_to_bring_back(
    owners: list[tuple[str, int]], parked: list[tuple[str, int]], shares: dict[str, float]
) -> list[int]:
    """While a light tenant still decodes, the set-aside rows (``parked``: each row's tenant and
    request) that rejoin the running batch (``owners``): of each tenant whose running rows have
    fallen to half its share (its limit in a step, :func:`step_shares`) or below, its last
    set-aside whole requests while its running rows stay within its share. Its finished rows are
    replaced by its own set-aside ones, so it keeps most of its share of the steps (the light
    tenant's steps cost what they cost, and the tenant set aside loses little). Not one by one,
    and the last ones first: the set-aside rows that stay are then the first ones, which keep
    their cache where it is (earlier ones leaving would move every row after them), so a return
    copies only the rows that return. The others rejoin as soon as no light tenant is left."""
    counts = Counter(tenant for tenant, _ in owners)
    chosen: list[int] = []
    for tenant in dict.fromkeys(t for t, _ in parked):
        share = max(1, int(shares.get(tenant, 0.0)))
        if counts.get(tenant, 0) > share // 2:
            continue
        room = share - counts.get(tenant, 0)
        for work in reversed(list(dict.fromkeys(w for t, w in parked if t == tenant))):
            rows = [i for i, (_, w) in enumerate(parked) if w == work]
            if len(rows) > room:
                break
            chosen += rows
            room -= len(rows)
    return sorted(chosen)
