"""The classification lane: waiting classification requests, run as batched forwards.

Each :meth:`ClassificationLane.step` runs one forward over the waiting requests that fit the batch
budgets, in fair order (app/engine/fair_queue.py): a request whose adapter has no device room yet
stops the batch, so that it is first in line for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.config import Settings
from app.engine.fair_queue import FairQueue
from app.engine.runner import Runner
from app.engine.slots import Admission
from app.engine.types import ClassifyWork, Flow
from app.errors import AdapterServeError, DeadlineExceeded, EngineFailure
from app.metrics import Metrics
from app.models.heads import Head

log = logging.getLogger(__name__)
Heads = dict[int, Head]  # slot -> classification head layers


def fits(rows: int, width: int, new_rows: int, new_width: int, max_rows: int, max_tokens: int) -> bool:
    """Whether ``new_rows`` inputs of up to ``new_width`` tokens join a batch of ``rows`` rows padded
    to ``width``: at most ``max_rows`` rows and ``max_tokens`` padded tokens (rows × widest)."""
    total, widest = rows + new_rows, max(width, new_width)
    return total <= max_rows and total * widest <= max_tokens


class ClassificationLane:
    """Waiting classification requests; a step is one batched forward (engine thread only)."""

    def __init__(
        self,
        runner: Runner,
        settings: Settings,
        metrics: Metrics,
        on_leave: Callable[[ClassifyWork], None] | None = None,
        charge: Callable[[Flow, int, int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self._charge = charge or (lambda flow, prompt, generated: None)  # tokens a work used
        self.queue: FairQueue[ClassifyWork] = FairQueue(settings.scheduler == "fair", on_leave)

    def queued(self) -> int:
        return len(self.queue)

    def busy(self) -> bool:
        return bool(self.queue)

    def queued_uids(self) -> set[int]:
        return {w.adapter.uid for w in self.queue}

    def resident_uids(self) -> set[int]:
        """Nothing outlives a step here: a batch runs to the end within one."""
        return set()

    def works(self) -> list[ClassifyWork]:
        return list(self.queue)

    def expire(self, now: float, error: AdapterServeError | None = None) -> None:
        """Fail the waiting requests whose deadline passed (they produced nothing: 504, or ``error``)."""
        if any(w.deadline <= now for w in self.queue):
            late = error or DeadlineExceeded.after(self.settings.request_timeout_s)
            for w in self.queue.remove_if(lambda w: w.deadline <= now):
                _fail(w, late)

    def fail_all(self, exc: AdapterServeError) -> None:
        for work in self.queue.clear():
            _fail(work, exc)

    def step(self, admission: Admission) -> None:
        """One forward over the waiting requests that fit (see the module docstring)."""
        works: list[tuple[ClassifyWork, int]] = []
        rows = width = 0
        s = self.settings
        if any(w.cancelled for w in self.queue):
            self.queue.remove_if(lambda w: w.cancelled)
        while (work := self.queue.peek()) is not None:
            new_width = max(len(ids) for ids in work.inputs)
            if works and not fits(
                rows, width, len(work.inputs), new_width, s.max_batch_size, s.max_batch_tokens
            ):
                break
            try:
                slot = admission.admit(work.adapter, work.weights)
            except RuntimeError:  # a device error (out of memory) copying the weights in
                log.exception("loading adapter %s failed", work.adapter.name)
                self.queue.pop()
                _fail(work, EngineFailure("loading the adapter failed; see the server log"))
                continue
            if slot is None:
                break
            self.queue.pop()
            works.append((work, slot))
            rows += len(work.inputs)
            width = max(width, new_width)
        if works:
            self._run(works, admission.slots.heads)

    def _run(self, works: list[tuple[ClassifyWork, int]], heads: Heads) -> None:
        try:
            batch = [(slot, ids) for w, slot in works for ids in w.inputs]
            self.metrics.batch_size.labels(task="classify").observe(len(batch))
            probs = self.runner.classify(batch, heads)
        except Exception as exc:  # any failure of the forward fails its batch; the engine goes on
            failed = [w for w, _ in works]
            self.runner.health.batch_failed(exc, "classify", lambda e: _fail_all(failed, e))
            return  # (batch_failed raises when the device is broken)
        self.runner.health.succeeded()
        start = 0
        for w, _ in works:
            if not w.future.done():
                w.future.set_result(probs[start : start + len(w.inputs)])
            start += len(w.inputs)
            self._charge(w.flow, w.cost, 0)


def _fail_all(works: list[ClassifyWork], exc: AdapterServeError) -> None:
    for work in works:
        _fail(work, exc)


def _fail(work: ClassifyWork, exc: AdapterServeError) -> None:
    if not work.future.done():
        work.future.set_exception(exc)
