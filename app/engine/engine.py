"""The engine loop: one thread owns the model; the API side awaits futures.

Each iteration applies pending commands (device loads, retired versions), unloads and compacts
adapter slots, then runs one classification batch and one step of the generation lane
(:mod:`app.engine.generation_lane`). Adapter slots are only changed here, between forwards.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from app.adapters.kinds import Adapter
from app.adapters.registry import AdapterInfo
from app.config import Settings
from app.engine.generation_lane import GenerationLane
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots, SlotsExhausted
from app.engine.types import (
    ClassifyWork,
    Command,
    GenerateWork,
    GenerationResult,
    SamplingParams,
    StreamDelta,
    Work,
)
from app.errors import DeadlineExceeded, EngineFailure, NotReady, QueueFull
from app.memory import keep_freed_memory
from app.metrics import Metrics
from app.models.base_lm import BaseLM
from app.models.multi_lora import RoutingContext, wrap_linear_layers
from app.threads import release_omp_threads

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05


class Engine:
    """Accepts classification/generation work from any thread and runs it batched on its own thread."""

    def __init__(self, base: BaseLM, settings: Settings, metrics: Metrics) -> None:
        self.base = base
        self.settings = settings
        self.metrics = metrics
        if settings.keep_freed_memory:
            keep_freed_memory()
        self.ctx = RoutingContext()
        self.layers = wrap_linear_layers(base.model, self.ctx)
        self.slots = DeviceSlots(
            self.layers,
            settings.max_device_adapters,
            base.device,
            base.dtype,
            byte_budget=settings.device_adapter_bytes(base.device),
            metrics=metrics,
        )
        self.runner = Runner(base, self.ctx, settings.max_consecutive_failures, metrics.forward_failures)
        self._inbox: queue.Queue[Work] = queue.Queue()
        self._classify: deque[ClassifyWork] = deque()
        self.gen = GenerationLane(self.runner, settings, metrics, self._decode, self._admit)
        self._retired: set[int] = set()  # replaced or deleted versions, unloaded once unused
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failed: BaseException | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        # the OpenMP team of the thread that loaded the model would slow every op of the engine
        # thread down (app/threads.py)
        release_omp_threads()
        self._thread = threading.Thread(target=self._loop, name="adapterserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failed is None

    @property
    def running_generations(self) -> int:
        """Rows in the running generation batch (read from any thread; a snapshot)."""
        batch = self.gen.running
        return len(batch.rows) if batch is not None else 0

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize() + len(self._classify) + len(self.gen.queue)

    # --- API side ---------------------------------------------------------------------------
    def _submit(self, work: Work) -> None:
        if not self.running or self._stop.is_set():
            raise NotReady("the engine is not running (starting or shutting down)")
        if not isinstance(work, Command) and self.queue_depth >= self.settings.max_queue:
            raise QueueFull(f"the request queue is full ({self.settings.max_queue}); retry shortly")
        self._inbox.put(work)
        self.metrics.queue_depth.set(self.queue_depth)

    async def _await(self, work: ClassifyWork | GenerateWork, fut: Future[T]) -> T:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.request_timeout_s)
        except TimeoutError as exc:
            work.cancelled = True
            raise DeadlineExceeded(
                f"request did not finish within {self.settings.request_timeout_s:g} s"
            ) from exc
        except asyncio.CancelledError:
            work.cancelled = True
            raise

    async def classify(
        self, adapter: AdapterInfo, inputs: list[list[int]], weights: Adapter | None = None
    ) -> list[list[float]]:
        work = ClassifyWork(adapter=adapter, weights=_weights(adapter, weights), inputs=inputs)
        self._submit(work)
        return await self._await(work, work.future)

    async def generate(
        self,
        adapter: AdapterInfo | None,
        prompt: list[int],
        params: SamplingParams,
        weights: Adapter | None = None,
    ) -> GenerationResult:
        w = _weights(adapter, weights) if adapter else None
        work = GenerateWork(adapter=adapter, weights=w, prompt=prompt, params=params)
        self._submit(work)
        return await self._await(work, work.future)

    def submit_stream(
        self,
        adapter: AdapterInfo | None,
        prompt: list[int],
        params: SamplingParams,
        sink: Callable[[StreamDelta], None],
        weights: Adapter | None = None,
    ) -> GenerateWork:
        """Queue a streamed generation; deltas go to ``sink`` (called on the engine thread)."""
        w = _weights(adapter, weights) if adapter else None
        work = GenerateWork(adapter=adapter, weights=w, prompt=prompt, params=params, sink=sink)
        self._submit(work)
        return work

    async def command(self, action: str, arg: Any = None) -> None:
        cmd = Command(action=action, arg=arg)
        self._submit(cmd)
        await asyncio.wrap_future(cmd.future)

    def retire(self, info: AdapterInfo) -> None:
        """Free the slot of an adapter version that was replaced or deleted, once unused (thread-safe)."""
        if self.running:
            self._inbox.put(Command(action="retire", arg=info.uid))

    # --- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        released = True  # whether this thread's OpenMP team was given back since the last work
        try:
            while not self._stop.is_set() or self._busy():
                busy = self._busy()
                if not busy and not released:  # idle: other threads may compute meanwhile
                    release_omp_threads()
                released = not busy
                self._drain_inbox(block=not busy)
                self._housekeeping()
                self._run_classify_batch()
                self.gen.step()
                self.metrics.queue_depth.set(self.queue_depth)
        except BaseException as exc:  # an unrecoverable engine error: fail everything, stop
            log.exception("engine loop failed")
            self.failed = exc
            self._fail_all(EngineFailure("the inference engine failed; see the server log"))

    def _busy(self) -> bool:
        return bool(self._classify or self.gen.busy() or not self._inbox.empty())

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000.0
        while True:
            self._accept(item)
            remaining = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            if len(self._classify) + len(self.gen.queue) >= self.settings.max_batch_size:
                self._accept(item)
                return

    def _accept(self, item: Work) -> None:
        if isinstance(item, ClassifyWork):
            self._classify.append(item)
        elif isinstance(item, GenerateWork):
            self.gen.queue.append(item)
        else:
            self._apply(item)

    def _busy_uids(self) -> set[int]:
        """Adapter versions that queued or running work still needs in their slots."""
        return self._queued_uids() | self.gen.resident_uids()

    def _housekeeping(self) -> None:
        """Unload retired versions nobody uses any more; compact the slot banks after unloads."""
        if self._retired:
            busy = self._busy_uids()
            for uid in [u for u in self._retired if u not in busy]:
                self.slots.unload(uid)
                self._retired.discard(uid)
                self.metrics.adapter_evictions.labels(tier="device").inc()
        moves = self.slots.compact()
        if moves:  # running rows follow their adapters to the new slots
            for batch in self.gen.batches():
                batch.remap_slots(moves)

    def _apply(self, cmd: Command) -> None:
        try:
            if cmd.action == "load":
                info, weights = cmd.arg
                self.slots.acquire(info, weights, keep=self._busy_uids())
            elif cmd.action == "retire":
                if cmd.arg in self.slots:
                    self._retired.add(cmd.arg)
            else:
                raise ValueError(f"unknown engine command {cmd.action!r}")
            cmd.future.set_result(None)
        except Exception as exc:
            cmd.future.set_exception(exc)

    def _queued_uids(self) -> set[int]:
        return {w.adapter.uid for w in self._classify} | {w.adapter.uid for w in self.gen.queue if w.adapter}

    def _admit(self, adapter: AdapterInfo, weights: Adapter, keep: set[int]) -> int | None:
        """The slot of a waiting request's adapter, loading it now; None: no room yet, keep waiting."""
        spare = frozenset() if adapter.uid in self.slots else frozenset(self._queued_uids())
        try:
            slot = self.slots.acquire(adapter, weights, keep, spare)
        except SlotsExhausted:
            return None
        keep.add(adapter.uid)
        return slot

    def _run_classify_batch(self) -> None:
        """One forward over the waiting classification requests that fit (FIFO: a request whose
        adapter has no room yet stops the batch, so that it is first in line for the next one)."""
        works: list[tuple[ClassifyWork, int]] = []
        rows = width = 0
        keep = self.gen.resident_uids()
        while self._classify:
            work = self._classify[0]
            if work.cancelled:
                self._classify.popleft()
                continue
            new_width = max(width, *(len(ids) for ids in work.inputs))
            too_big = rows + len(work.inputs) > self.settings.max_batch_size or (
                new_width * (rows + len(work.inputs)) > self.settings.max_batch_tokens
            )
            if works and too_big:
                break
            try:
                slot = self._admit(work.adapter, work.weights, keep)
            except Exception:
                log.exception("loading adapter %s failed", work.adapter.name)
                self._classify.popleft()
                work.future.set_exception(EngineFailure("loading the adapter failed; see the server log"))
                continue
            if slot is None:
                break
            self._classify.popleft()
            works.append((work, slot))
            rows += len(work.inputs)
            width = new_width
        if not works:
            return
        try:
            batch = [(slot, ids) for w, slot in works for ids in w.inputs]
            self.metrics.batch_size.labels(task="classify").observe(len(batch))
            probs = self.runner.classify(batch, self.slots.heads)
        except Exception as exc:
            log.exception("classification batch failed")
            for w, _ in works:
                w.future.set_exception(EngineFailure("the classification batch failed; see the server log"))
            self.runner.health.failed(exc, "classify")  # raises when the device is broken
            return
        self.runner.health.succeeded()
        start = 0
        for w, _ in works:
            w.future.set_result(probs[start : start + len(w.inputs)])
            start += len(w.inputs)

    def _decode(self, tokens: list[int]) -> str:
        return str(self.base.tokenizer.decode(tokens, skip_special_tokens=True))

    def _fail_all(self, exc: EngineFailure) -> None:
        pending: list[ClassifyWork | GenerateWork] = [*self._classify, *self.gen.queue]
        for batch in self.gen.batches():
            pending += [row.work for row in batch.rows]
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if not isinstance(item, Command):
                pending.append(item)
        for w in pending:
            if not w.future.done():
                w.future.set_exception(exc)
            if isinstance(w, GenerateWork) and w.sink is not None:
                w.sink(StreamDelta(text="", error=exc.message))


def _weights(adapter: AdapterInfo, weights: Adapter | None) -> Adapter:
    w = weights if weights is not None else adapter.weights
    if w is None:
        raise EngineFailure(f"adapter {adapter.name!r} is not loaded in host memory")
    return w
