"""The engine loop: one thread owns the model; the API side awaits futures.

The engine is a loop over two lanes of the same shape (:class:`ClassificationLane`,
:class:`GenerationLane`: a queue, ``expire``, ``step``). Each iteration applies pending commands
(typed: load, pin, unpin, retire an adapter version), unloads and compacts adapter slots, ends the
work whose deadline passed, then steps each lane once: a classification forward, a prefill chunk
and a decode step. Adapter slots are only changed here, between forwards; the lanes reach them
through an :class:`Admission` made for their step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from app.adapters.kinds import Adapter
from app.adapters.version import AdapterVersion
from app.config import Settings
from app.engine.classification_lane import ClassificationLane
from app.engine.gauges import report_gauges
from app.engine.generation_lane import GenerationLane
from app.engine.queue_shares import QueueShares
from app.engine.runner import Runner
from app.engine.slots import Admission, DeviceSlots, SlotsExhausted
from app.engine.types import (
    ONE_FLOW,
    Abort,
    ClassifyWork,
    Command,
    CutOffAll,
    Flow,
    GenerateWork,
    Generation,
    GenerationResult,
    Lane,
    LoadAdapter,
    PinAdapter,
    RetireAdapter,
    RowOutput,
    StreamDelta,
    StreamSink,
    UnpinAdapter,
    Work,
)
from app.errors import (
    AdapterServeError,
    DeadlineExceeded,
    DeviceBusy,
    EngineFailure,
    NotReady,
    QueueFull,
)
from app.metrics import Metrics
from app.models.base_lm import BaseLM
from app.models.multi_lora import RoutingContext, wrap_linear_layers
from app.platform import release_omp_threads

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05
_ARRIVAL_GAP_S = 0.001  # a batch stops waiting to fill after this long without a new arrival
_GAUGES_EVERY_S = 0.5  # how often the engine thread refreshes the queue gauges
# the API side (futures and streams) waits this much longer than a request's deadline: the engine
# itself ends the work at its deadline (with the tokens produced so far) after at most one more step
DEADLINE_GRACE_S = 30.0


class Engine:
    """Accepts classification/generation work from any thread and runs it batched on its own thread."""

    def __init__(self, base: BaseLM, settings: Settings, metrics: Metrics) -> None:
        self.base = base
        self.settings = settings
        self.metrics = metrics
        self.ctx = RoutingContext(settings.lora_bits)
        self.layers = wrap_linear_layers(base.model, self.ctx)
        budget = settings.device_adapter_bytes(base.device)
        self.slots = DeviceSlots(
            self.layers, settings.max_device_adapters, base.device, base.dtype, budget, metrics
        )
        limit, failures = settings.max_consecutive_failures, metrics.forward_failures
        self.runner = Runner(base, self.ctx, limit, failures, settings.one_row_decode, settings.native_step)
        self._inbox: queue.Queue[Work | Command] = queue.Queue()
        # each tenant's queued work (the inbox and the lanes' queues), for its share of MAX_QUEUE
        self.shares = QueueShares(settings.max_queue, metrics)
        self._gauges_at = 0.0
        # tokens a tenant's finished work used (prompt + generated): the tenant quotas (app/quotas.py)
        self.charge_tokens: Callable[[str, int], None] = lambda tenant, tokens: None
        self.classification = ClassificationLane(self.runner, settings, metrics, self._left, self._charge)
        self.gen = GenerationLane(self.runner, settings, metrics, self._decode, self._left, self._charge)
        self.lanes: tuple[Lane, ...] = (self.classification, self.gen)
        # replaced or deleted versions (uid -> when retired), unloaded once unused; a version that is
        # not resident is remembered for a request's lifetime: work that resolved it before it was
        # retired may still bring it in
        self._retired: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failed: BaseException | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        # the OpenMP team of the thread that loaded the model would slow every op of the engine
        # thread down (app/platform.py)
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
        """Rows in the running generation batch and set aside from it (any thread; a snapshot)."""
        return sum(len(b.rows) for b in (self.gen.running, self.gen.parked) if b is not None)

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize() + sum(lane.queued() for lane in self.lanes)

    def device_uids(self) -> frozenset[int]:
        """Adapter versions resident in device slots now (a snapshot, for any thread)."""
        return self.slots.resident

    # --- API side ---------------------------------------------------------------------------
    def _submit(self, item: Work | Command) -> None:
        if not self.running or self._stop.is_set():
            raise NotReady("the engine is not running (starting or shutting down)")
        if isinstance(item, ClassifyWork | GenerateWork):
            if self.queue_depth >= self.settings.max_queue:
                raise QueueFull(f"the request queue is full ({self.settings.max_queue}); retry shortly")
            self.shares.enter(item.flow)
            item.deadline = time.monotonic() + self.settings.request_timeout_s
        self._inbox.put(item)
        if self.failed is not None:  # it failed meanwhile, perhaps after its last look at the inbox
            self._fail_inbox(EngineFailure("the inference engine failed; see the server log"))
        self.metrics.queue_depth.set(self.queue_depth)

    def _left(self, work: Work) -> None:
        """A work item left the queues (into a batch, or failed)."""
        self.shares.left(work.flow)

    def waiting(self, tenant: str) -> int:
        """``tenant``'s queued requests (any thread)."""
        return self.shares.waiting(tenant)

    def _charge(self, flow: Flow, prompt: int, generated: int) -> None:
        m = self.metrics
        m.tenant_tokens.labels(tenant=flow.tenant, kind="prompt").inc(prompt)
        if generated:
            m.tenant_tokens.labels(tenant=flow.tenant, kind="generated").inc(generated)
        self.charge_tokens(flow.tenant, prompt + generated)

    async def _await(self, work: Work, fut: Future[T]) -> T:
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(fut), self.settings.request_timeout_s + DEADLINE_GRACE_S
            )
        except TimeoutError as exc:  # the engine did not end the work at its deadline (a stuck step)
            self.abort(work)
            raise DeadlineExceeded.after(self.settings.request_timeout_s) from exc
        except asyncio.CancelledError:
            self.abort(work)
            raise

    def abort(self, work: Work) -> None:
        """Give up on ``work`` (thread-safe): the engine drops its rows at the next step."""
        if self.running and not work.future.done():
            self._inbox.put(Abort(work))

    async def classify(
        self, adapter: AdapterVersion | None, inputs: list[list[int]], weights: Adapter | None,
        flow: Flow = ONE_FLOW, output: RowOutput = "probs", top: int = 0,
    ) -> list[Any]:  # fmt: skip
        """Each input's ``output`` (see :class:`ClassifyWork`; ``adapter`` None: the bare base)."""
        return await self.run(ClassifyWork(adapter, weights, inputs, flow, output=output, top=top))

    async def run(self, work: ClassifyWork) -> list[Any]:
        """Run ``work`` in the classification lane (with ``explain`` set, its token attributions are
        in ``work.explanations`` afterwards: app/engine/explain.py)."""
        self._submit(work)
        return await self._await(work, work.future)

    def submit(self, generation: Generation, sink: StreamSink | None = None) -> GenerateWork:
        """Queue a generation; with ``sink``, its deltas go there as they come (called on the engine
        thread). Raises :class:`QueueFull` or :class:`NotReady` before anything is queued."""
        work = GenerateWork(generation, sink=sink)
        self._submit(work)
        return work

    async def generate(self, generation: Generation) -> GenerationResult:
        """Run ``generation`` to its end (the bare base, one adapter or an ensemble's members)."""
        work = self.submit(generation)
        return await self._await(work, work.future)

    async def _command(self, cmd: Command) -> None:
        self._submit(cmd)
        await asyncio.wrap_future(cmd.future)

    async def load(self, version: AdapterVersion, weights: Adapter) -> None:
        """Bring ``version`` into a device slot now (raises :class:`DeviceBusy` when none can be freed)."""
        await self._command(LoadAdapter(version, weights))

    async def pin(self, version: AdapterVersion, weights: Adapter) -> None:
        """Load ``version`` and keep its name's resident versions from eviction; unchanged on failure."""
        await self._command(PinAdapter(version, weights))

    async def unpin(self, name: str) -> None:
        await self._command(UnpinAdapter(name))

    def cut_off_all(self) -> None:
        """End every queued and running request now (thread-safe; the shutdown grace ran out):
        running generations return what they generated (``finish_reason`` timeout), the rest 503."""
        if self.running:
            self._inbox.put(CutOffAll())

    def retire(self, version: AdapterVersion) -> None:
        """Free the slot of a version that was replaced or deleted, once unused (thread-safe)."""
        if self.running:
            self._inbox.put(RetireAdapter(version.uid))

    # --- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        released = True  # whether this thread's OpenMP team was given back since the last work
        try:
            while not self._stop.is_set() or self._busy():
                busy = self._busy()
                if not busy and not released:  # idle: other threads may compute meanwhile
                    release_omp_threads()
                    self.runner.drop_batch_copies(self.slots.layers.values())
                    self._report_gauges()  # (as they stand now, not as at the last refresh)
                released = not busy
                self._drain_inbox(block=not busy)
                self._housekeeping()
                now = time.monotonic()
                for lane in self.lanes:
                    lane.expire(now)
                # a classification forward, a prefill chunk, then (with the classification requests
                # that came meanwhile: they need not wait for the decode step) a decode step
                self.classification.step(self._admission())
                self.gen.prefill_step(self._admission())
                self._drain_inbox(block=False)
                self.classification.step(self._admission())
                self.gen.decode_step()
                self.metrics.queue_depth.set(self.queue_depth)
                if now - self._gauges_at > _GAUGES_EVERY_S:
                    self._gauges_at = now
                    self._report_gauges()
        except BaseException as exc:  # an unrecoverable engine error: fail everything, stop
            log.exception("engine loop failed")
            self.failed = exc
            self._fail_all(EngineFailure("the inference engine failed; see the server log"))

    def _report_gauges(self) -> None:
        """The gauges that describe the engine's state (engine thread; app/engine/gauges.py)."""
        report_gauges(
            self.metrics, self.settings, self.shares, self.classification, self.gen, self.queue_depth
        )

    def _busy(self) -> bool:
        return any(lane.busy() for lane in self.lanes) or not self._inbox.empty()

    def _admission(self) -> Admission:
        keep: set[int] = set().union(*(lane.resident_uids() for lane in self.lanes))
        return Admission(self.slots, keep, self._queued_uids)

    def _queued_uids(self) -> frozenset[int]:
        return frozenset().union(*(lane.queued_uids() for lane in self.lanes))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000.0
        while True:
            self._accept(item)
            # wait for more while it keeps coming (clients sending together), not after a lull
            remaining = min(deadline - time.monotonic(), _ARRIVAL_GAP_S)
            try:
                item = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            if sum(lane.queued() for lane in self.lanes) >= self.settings.max_batch_size:
                self._accept(item)
                return

    def _accept(self, item: Work | Command) -> None:
        match item:
            case ClassifyWork():
                self.classification.queue.append(item)
            case GenerateWork():
                self.gen.queue.append(item)
            case _:
                self._apply(item)

    def _busy_uids(self) -> set[int]:
        """Adapter versions that queued or running work still needs in their slots."""
        return set(self._queued_uids()).union(*(lane.resident_uids() for lane in self.lanes))

    def _housekeeping(self) -> None:
        """Unload retired versions nobody uses any more; compact the slot banks after unloads."""
        if self._retired:
            busy = self._busy_uids()
            forget_before = time.monotonic() - self.settings.request_timeout_s - DEADLINE_GRACE_S
            for uid, retired_at in list(self._retired.items()):
                if uid in busy:
                    continue
                if uid in self.slots:
                    self.slots.unload(uid)
                    self.metrics.adapter_evictions.labels(tier="device").inc()
                    del self._retired[uid]
                elif retired_at < forget_before:
                    del self._retired[uid]
        moves = self.slots.compact()
        if moves:  # running rows follow their adapters to the new slots
            for batch in self.gen.batches():
                batch.remap_slots(moves)

    def _apply(self, cmd: Command) -> None:
        try:
            match cmd:
                case LoadAdapter(version, weights):
                    self._acquire(version, weights)
                case PinAdapter(version, weights):
                    self._acquire(version, weights)
                    self.slots.pinned = self.slots.pinned | {version.name}
                case UnpinAdapter(name):
                    self.slots.pinned = self.slots.pinned - {name}
                case RetireAdapter(uid):
                    self._retired.setdefault(uid, time.monotonic())
                    self.gen.prefix.drop(uid)
                case Abort(work):
                    work.cancelled = True
                case CutOffAll():
                    self._cut_off_all()
            cmd.future.set_result(None)
        except Exception as exc:
            cmd.future.set_exception(exc)

    def _cut_off_all(self) -> None:
        while not self._inbox.empty():  # work that arrived with this command joins the queues first
            item = self._inbox.get_nowait()
            if isinstance(item, ClassifyWork | GenerateWork):
                self._accept(item)
            elif not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down"))
        gone = NotReady("the server shut down before this request ran; retry on another replica")
        now = time.monotonic()
        for lane in self.lanes:
            for work in lane.works():
                work.deadline = now
            lane.expire(now, gone)

    def _acquire(self, version: AdapterVersion, weights: Adapter) -> None:
        try:
            self.slots.acquire(version, weights, keep=self._busy_uids())
        except SlotsExhausted as exc:
            raise DeviceBusy(
                f"no device slot can be freed for adapter {version.name!r} now: every resident adapter "
                "is in use or pinned; retry shortly",
                param="name",
            ) from exc

    def _decode(self, tokens: list[int]) -> str:
        return str(self.base.tokenizer.decode(tokens, skip_special_tokens=True))

    def _fail_all(self, exc: AdapterServeError) -> None:
        for lane in self.lanes:
            lane.fail_all(exc)
        self._fail_inbox(exc)

    def _fail_inbox(self, exc: AdapterServeError) -> None:
        """Fail what waits in the inbox (any thread: the queue is thread-safe)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:  # (the API thread may drain it too)
                return
            if isinstance(item, ClassifyWork | GenerateWork):
                self._left(item)
            if not item.future.done():
                item.future.set_exception(exc)
            if isinstance(item, GenerateWork) and item.sink is not None:
                item.sink(StreamDelta(text="", error=exc))
