"""Continuous batching of generation requests, driven by the engine thread.

Each :meth:`GenerationLane.step` runs one prefill chunk for waiting requests (when the running
batch has room) and then one decode step of the running batch; prefilled rows join it at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from app.adapters.kinds import Adapter
from app.adapters.registry import AdapterInfo
from app.config import Settings
from app.engine.generation import Decode, GenerationBatch, mergeable
from app.engine.runner import Runner
from app.engine.types import GenerateWork, GenerationResult, StreamDelta
from app.errors import EngineFailure
from app.metrics import Metrics
from app.models.multi_lora import BASE_SLOT

log = logging.getLogger(__name__)

# the slot of a waiting request's adapter (loading it now), or None while there is no room
Admit = Callable[[AdapterInfo, Adapter, set[int]], int | None]


class GenerationLane:
    """The generation queue, the batch being prefilled and the running (decoding) batch."""

    def __init__(
        self, runner: Runner, settings: Settings, metrics: Metrics, decode: Decode, admit: Admit
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self._decode = decode
        self._admit = admit
        self.queue: deque[GenerateWork] = deque()
        self.running: GenerationBatch | None = None  # the decoding rows
        self.prefill: GenerationBatch | None = None  # new rows whose prompts are being prefilled

    def batches(self) -> list[GenerationBatch]:
        return [b for b in (self.running, self.prefill) if b is not None]

    def resident_uids(self) -> set[int]:
        """Adapter versions of the rows generating now (their slots must stay)."""
        return {row.work.adapter.uid for b in self.batches() for row in b.rows if row.work.adapter}

    def busy(self) -> bool:
        return bool(self.queue or self.running or self.prefill)

    def step(self) -> None:
        """One prefill chunk for waiting requests (if any), then one decode step of the running batch."""
        running = self.running
        if running is not None:
            running.drop_cancelled()
            if not running.rows:
                running = self.running = None
        if self.prefill is None and self.queue and (running is None or mergeable(running.cache)):
            room = self.settings.max_batch_size - (len(running) if running else 0)
            if room > 0:
                self.prefill = self._start_prefill(room)
        if self.prefill is not None:
            self._advance_prefill()
        running = self.running
        if running is None or not running.rows:
            return
        self.metrics.batch_size.labels(task="generate").observe(len(running))
        try:
            finished = running.step(self._decode)
        except Exception as exc:
            log.exception("generation step failed")
            fail_rows([row.work for row in running.rows], "the generation batch failed")
            self.running = None
            self.runner.health.failed(exc, "generate")  # raises when the device is broken
            return
        self.runner.health.succeeded()
        self._finish(finished)
        if not running.rows:
            self.running = None

    def _start_prefill(self, room: int) -> GenerationBatch | None:
        """Take up to ``room`` waiting requests (FIFO), as device room and the prefill budget allow."""
        keep = self.resident_uids()
        pairs: list[tuple[GenerateWork, int]] = []
        width = 0
        while self.queue and len(pairs) < room:
            work = self.queue[0]
            if work.cancelled:
                self.queue.popleft()
                continue
            new_width = max(width, len(work.prompt))
            if pairs and new_width * (len(pairs) + 1) > self.settings.max_prefill_tokens:
                break
            slot: int | None = BASE_SLOT
            if work.adapter is not None and work.weights is not None:
                try:
                    slot = self._admit(work.adapter, work.weights, keep)
                except Exception:
                    log.exception("loading adapter %s failed", work.adapter.name)
                    self.queue.popleft()
                    fail_rows([work], "loading the adapter failed")
                    continue
            if slot is None:
                break
            self.queue.popleft()
            pairs.append((work, slot))
            width = new_width
        if not pairs:
            return None
        self.metrics.batch_size.labels(task="prefill").observe(len(pairs))
        return GenerationBatch.start(self.runner, pairs)

    def _advance_prefill(self) -> None:
        """One chunk of the prefill; when it completes, its rows join the running batch."""
        batch = self.prefill
        assert batch is not None
        try:
            finished = batch.prefill_chunk(self.settings.max_prefill_tokens, self._decode)
        except Exception as exc:
            log.exception("prefill failed")
            fail_rows([row.work for row in batch.rows], "the prefill batch failed")
            self.prefill = None
            self.runner.health.failed(exc, "prefill")  # raises when the device is broken
            return
        self.runner.health.succeeded()
        if finished is None:
            return
        self.prefill = None
        self._finish(finished)
        if not batch.rows:
            return
        if self.running is None:
            self.running = batch
        else:
            self.running.extend(batch)

    def _finish(self, finished: list[tuple[GenerateWork, GenerationResult]]) -> None:
        now = time.monotonic()
        m = self.metrics
        for work, result in finished:
            if not work.future.done():
                work.future.set_result(result)
            n = len(result.token_ids)
            m.generated_tokens.labels(adapter=m.adapter_label(work.adapter)).inc(n)
            if work.first_token_at is not None:
                m.time_to_first_token.observe(work.first_token_at - work.enqueued_at)
                if n > 1:
                    m.time_per_output_token.observe((now - work.first_token_at) / (n - 1))


def fail_rows(works: list[GenerateWork], message: str) -> None:
    """Fail these requests (streams get an error event)."""
    for work in works:
        if not work.future.done():
            work.future.set_exception(EngineFailure(f"{message}; see the server log"))
        if work.sink is not None:
            work.sink(StreamDelta(text="", error=f"{message}; see the server log"))
