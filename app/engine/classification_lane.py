"""The classification lane: waiting classification requests, run as batched forwards.

Each :meth:`ClassificationLane.step` runs one forward over the waiting requests that fit the batch
budgets, in fair order (app/engine/fair_queue.py): a request whose adapter has no device room yet
stops the batch, so that it is first in line for the next one. A request that asks for token
attributions leaves the queue for the explaining list once its adapter has a slot; each step then
also runs one chunk of the explanation first in that list (app/engine/explain.py), whose adapter
stays resident until it is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from app.config import Settings
from app.engine.explain import Explanation, baseline_ids, explain
from app.engine.fair_queue import FairQueue
from app.engine.runner import Row, Runner
from app.engine.slots import Admission
from app.engine.types import ClassifyWork, Flow
from app.errors import AdapterServeError, DeadlineExceeded, EngineFailure
from app.metrics import Metrics
from app.models.heads import Head
from app.models.quantized_layers import drop_backward_weights
from app.models.routing import BASE_SLOT

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
        # explanations under way: the work and its chunks (each step runs one)
        self.explaining: list[tuple[ClassifyWork, Iterator[None]]] = []
        self._backward_weights = False  # whether an explanation ran since they were last dropped

    def queued(self) -> int:
        return len(self.queue)

    def busy(self) -> bool:
        return bool(self.queue) or bool(self.explaining)

    def queued_uids(self) -> set[int]:
        return {w.adapter.uid for w in self.queue if w.adapter is not None}

    def resident_uids(self) -> set[int]:
        """The adapters of the explanations under way (a plain batch runs to its end within a step)."""
        return {w.adapter.uid for w, _ in self.explaining if w.adapter is not None}

    def works(self) -> list[ClassifyWork]:
        return [*self.queue, *(w for w, _ in self.explaining)]

    def expire(self, now: float, error: AdapterServeError | None = None) -> None:
        """Fail the requests whose deadline passed (they produced nothing: 504, or ``error``)."""
        if any(w.deadline <= now for w in self.works()):
            late = error or DeadlineExceeded.after(self.settings.request_timeout_s)
            for w in self.queue.remove_if(lambda w: w.deadline <= now):
                _fail(w, late)
            for w, _ in self.explaining:
                if w.deadline <= now:
                    _fail(w, late)
            self.explaining = [(w, it) for w, it in self.explaining if not w.future.done()]
            self._settle()

    def fail_all(self, exc: AdapterServeError) -> None:
        for work in [*self.queue.clear(), *(w for w, _ in self.explaining)]:
            _fail(work, exc)
        self.explaining = []
        self._settle()

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
                slot: int | None = BASE_SLOT
                if work.adapter is not None:
                    assert work.weights is not None
                    slot = admission.admit(work.adapter, work.weights)
            except RuntimeError:  # a device error (out of memory) copying the weights in
                log.exception("loading adapter %s failed", work.adapter and work.adapter.name)
                self.queue.pop()
                _fail(work, EngineFailure("loading the adapter failed; see the server log"))
                continue
            if slot is None:
                break
            self.queue.pop()
            if work.explain is not None:
                self.explaining.append((work, self._explain(work, slot, admission.slots.heads)))
                continue
            works.append((work, slot))
            rows += len(work.inputs)
            width = max(width, new_width)
        if works:
            self._run(works, admission.slots.heads)
        self._explain_chunk()

    def _explain_chunk(self) -> None:
        """One chunk of the first explanation under way (then it goes to the back of the list)."""
        self.explaining = [(w, it) for w, it in self.explaining if not (w.cancelled or w.future.done())]
        if self.explaining:
            self._backward_weights = True
            work, chunks = self.explaining.pop(0)
            try:
                done = next(chunks, True)
            except Exception as exc:  # a failed forward or backward fails its request; the engine goes on
                self.runner.health.batch_failed(exc, "classify", lambda e: _fail(work, e))
            else:
                self.runner.health.succeeded()
                if done is None:
                    self.explaining.append((work, chunks))
        self._settle()

    def _settle(self) -> None:
        """With no explanation under way, free what quantized layers kept for backward passes."""
        if not self.explaining and self._backward_weights:
            drop_backward_weights(self.runner.model)
            self._backward_weights = False

    def _explain(self, work: ClassifyWork, slot: int, heads: Heads) -> Iterator[None]:
        """The chunks of ``work``'s explanations, input after input; at the end its result is set."""
        assert work.explain is not None and work.special is not None
        r = self.runner
        logits = r.embedded_logits(slot, heads[slot])
        out: list[Explanation] = []
        for ids, special in zip(work.inputs, work.special, strict=True):
            x, base = r.embed([ids, baseline_ids(ids, special, r.pad_id)])
            for step in explain(logits, x, base, work.explain, self.settings.explain_chunk_tokens):
                if step is None:
                    yield None
                else:
                    out.append(step)
        work.explanations = out
        self.metrics.batch_size.labels(task="classify").observe(len(work.inputs))
        self._charge(work.flow, work.cost, 0)  # before the answer: its next request sees the charge
        if not work.future.done():
            work.future.set_result([e.probs for e in out])

    def _run(self, works: list[tuple[ClassifyWork, int]], heads: Heads) -> None:
        try:
            batch = [Row(slot, ids, w.output, w.top) for w, slot in works for ids in w.inputs]
            self.metrics.batch_size.labels(task="classify").observe(len(batch))
            probs = self.runner.classify(batch, heads)
        except Exception as exc:  # any failure of the forward fails its batch; the engine goes on
            failed = [w for w, _ in works]
            self.runner.health.batch_failed(exc, "classify", lambda e: _fail_all(failed, e))
            return  # (batch_failed raises when the device is broken)
        self.runner.health.succeeded()
        start = 0
        for w, _ in works:
            self._charge(w.flow, w.cost, 0)  # before the answer: its next request sees the charge
            if not w.future.done():
                w.future.set_result(probs[start : start + len(w.inputs)])
            start += len(w.inputs)


def _fail_all(works: list[ClassifyWork], exc: AdapterServeError) -> None:
    for work in works:
        _fail(work, exc)


def _fail(work: ClassifyWork, exc: AdapterServeError) -> None:
    if not work.future.done():
        work.future.set_exception(exc)
