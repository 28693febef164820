"""What a decode step costs by its rows, learned from the steps the engine runs.

Fair scheduling uses it to keep a light tenant's steps cheap: while it decodes, the heavier
tenants' rows in its steps are capped so that a step costs at most ``fair_step_slowdown`` times a
step of the light tenant's rows alone. The cost is a line ``a + b * rows`` fitted to the recent
cost of each row count seen (an exponential average per count), so the cap follows the machine
and the base's format: on a CPU a step's cost grows with its rows, on a GPU it barely does (and
the cap is the whole batch).
"""

from __future__ import annotations

import math

SMOOTHING = 0.2  # weight of a new step in its row count's average


class StepCosts:
    """Recent decode step seconds per row count, and the line through them."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        old = self._seconds.get(rows)
        self._seconds[rows] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def line(self) -> tuple[float, float] | None:
        """``(a, b)``: seconds per step and per row, by least squares over the row counts seen;
        None before two row counts were seen."""
        if len(self._seconds) < 2:
            return None
        n = len(self._seconds)
        mx = sum(self._seconds) / n
        my = sum(self._seconds.values()) / n
        sxx = sum((x - mx) ** 2 for x in self._seconds)
        sxy = sum((x - mx) * (y - my) for x, y in self._seconds.items())
        b = sxy / sxx
        return my - b * mx, b

    def rows_within(self, slowdown: float, rows: int, most: int) -> int:
        """The most rows (between ``rows`` and ``most``) a step may have so that it costs at most
        ``slowdown`` times a step of ``rows`` rows; ``most`` while the costs are unknown or do
        not grow with the rows."""
        fit = self.line()
        if fit is None or fit[1] <= 0:
            return most
        a, b = fit
        alone = max(
            a + b * rows, b * rows
        )  # a negative intercept: the step of `rows` costs its rows at least
        return max(rows, min(most, math.floor((slowdown * alone - a) / b)))
