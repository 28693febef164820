"""The generation lane: continuous batching of generation requests, driven by the engine thread.

Each :meth:`GenerationLane.step` runs one prefill chunk for waiting requests (when the running
batch has room) and then one decode step of the running batch; prefilled rows join it at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from app.config import Settings
from app.engine import kv_cache
from app.engine.detokenize import Decode
from app.engine.fair_queue import FairQueue
from app.engine.generation import Finished, GenerationBatch
from app.engine.prefix_cache import PrefixCache
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
from app.engine.runner import Runner
from app.engine.slots import Admission
from app.engine.step_costs import StepCosts
from app.engine.types import Flow, GenerateWork, StreamDelta
from app.errors import AdapterServeError, DeadlineExceeded, EngineFailure
from app.metrics import Metrics
from app.models.multi_lora import BASE_SLOT

log = logging.getLogger(__name__)


# padding (or cached tokens computed again) up to this many token columns costs about what a
# prefill forward of its own costs (on 2 CPU cores a forward of the default base reads every weight
# once, ~20 ms: the compute of ~40-60 tokens)
PAD_TOKENS = 64


def prefill_fits(
    batch: list[tuple[int, int]], prompt: int, cached: int, max_tokens: int, need: int = 1
) -> bool:
    """Whether a prompt of ``prompt`` tokens, the first ``cached`` of them in the prefix cache
    (``need`` rows: an ensemble's members), joins a prefill batch of rows ``batch`` (each its prompt
    and cached tokens).

    A batch computes its last ``W`` columns for every row, ``W`` its longest uncached part: a
    shorter row's columns beyond its own uncached part are padding, or its cached tokens computed
    again. The first request always joins; later ones while rows × ``W`` ≤ ``max_tokens`` and the
    columns computed for nothing stay within :data:`PAD_TOKENS` or a quarter of the needed ones (a
    long uncached prompt does not make a conversation's cached turn prefill again, nor a short
    prompt wait through a long one's padding: it takes the next batch)."""
    if not batch:
        return True
    new = prompt - cached
    window = max(new, *(p - c for p, c in batch))
    rows = len(batch) + need
    needed = need * new + sum(p - c for p, c in batch)
    return rows * window <= max_tokens and rows * window - needed <= max(PAD_TOKENS, needed // 4)


class GenerationLane:
    """The generation queue, the batch being prefilled and the running (decoding) batch."""

    def __init__(
        self,
        runner: Runner,
        settings: Settings,
        metrics: Metrics,
        decode: Decode,
        on_leave: Callable[[GenerateWork], None] | None = None,
        charge: Callable[[Flow, int, int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self._charge = charge or (lambda flow, prompt, generated: None)  # tokens a work used
        self._decode = decode
        self.queue: FairQueue[GenerateWork] = FairQueue(settings.scheduler == "fair", on_leave)
        self.running: GenerationBatch | None = None  # the decoding rows
        self.prefill: GenerationBatch | None = None  # new rows whose prompts are being prefilled
        self.parked: GenerationBatch | None = None  # rows set aside while a lighter tenant decodes
        self.prefix = PrefixCache(settings.prefix_cache_budget(runner.device), runner.kv_dtype)
        self.costs = StepCosts()  # decode step seconds by rows (fair scheduling's step limits)

    def batches(self) -> list[GenerationBatch]:
        return [b for b in (self.running, self.prefill, self.parked) if b is not None]

    def queued_uids(self) -> set[int]:
        return {uid for w in self.queue for uid in w.uids}

    def resident_uids(self) -> set[int]:
        """Adapter versions of the rows generating now (their slots must stay)."""
        return {row.uid for b in self.batches() for row in b.rows if row.uid is not None}

    def queued(self) -> int:
        return len(self.queue)

    def busy(self) -> bool:
        return bool(self.queue or self.running or self.prefill or self.parked)

    def works(self) -> list[GenerateWork]:
        return list(self.queue) + [row.work for b in self.batches() for row in b.rows]

    def expire(self, now: float, error: AdapterServeError | None = None) -> None:
        """Deadlines: waiting and prefilling requests have no tokens yet (504, or ``error``); running
        rows end with the tokens they have (``finish_reason`` timeout)."""
        late = error or DeadlineExceeded.after(self.settings.request_timeout_s)
        if any(w.deadline <= now for w in self.queue):
            fail_rows(self.queue.remove_if(lambda w: w.deadline <= now), late)
        if self.prefill is not None:
            expired = [row.work for row in self.prefill.rows if row.work.deadline <= now]
            fail_rows(expired, late)
            for work in expired:
                work.cancelled = True  # dropped when the prefill completes
        for batch in (self.running, self.parked):
            if batch is not None:
                self._finish(batch.cut_off(now))
        if self.running is not None and not self.running.rows:
            self.running = None
        if self.parked is not None and not self.parked.rows:
            self.parked = None

    def fail_all(self, exc: AdapterServeError) -> None:
        works = self.queue.clear() + [row.work for b in self.batches() for row in b.rows]
        self.running = self.prefill = self.parked = None
        fail_rows(works, exc)

    def step(self, admission: Admission) -> None:
        """One prefill chunk for waiting requests (if any), then one decode step of the running batch."""
        self.prefill_step(admission)
        self.decode_step()

    def prefill_step(self, admission: Admission) -> None:
        """Start a prefill of waiting requests when none runs, then run one chunk of it."""
        running = self.running
        if running is not None:
            running.drop_cancelled()
            if not running.rows:
                running = self.running = None
        if self.prefill is None and self.queue and (running is None or kv_cache.mergeable(running.cache)):
            self.prefill = self._start_prefill(admission)
        if self.prefill is not None:
            self._advance_prefill()

    def decode_step(self) -> None:
        """One decode step of the running batch."""
        if self.queue.fair:
            self._rebalance()
        running = self.running
        if running is None or not running.rows:
            return
        self.metrics.batch_size.labels(task="generate").observe(len(running))
        rows, started = len(running), time.perf_counter()
        try:
            finished = running.step()
        except Exception as exc:  # any failure of the forward fails its batch; the engine goes on
            self.running = None
            works = [row.work for row in running.rows]
            self.runner.health.batch_failed(exc, "generate", lambda e: fail_rows(works, e))
            return
        self.costs.record(rows, time.perf_counter() - started)
        self.runner.health.succeeded()
        self._finish(finished)
        if not running.rows:
            self.running = None

    def _shares(self) -> dict[str, float]:
        """Each active tenant's share of the batch's rows (:func:`row_shares`, by weight)."""
        weights = {r.work.flow.tenant: r.work.flow.weight for b in self.batches() for r in b.rows}
        weights |= {w.flow.tenant: w.flow.weight for w in self.queue}
        return row_shares({}, weights, self.settings.max_batch_size)

    def _limits(self, owners: list[tuple[str, int]], shares: dict[str, float]) -> dict[str, float]:
        """Each tenant's rows in a step while a light one decodes (:func:`step_shares`, for a step
        that costs at most ``fair_step_slowdown`` times one of the light tenants' rows alone)."""
        if not light(owners, shares):
            return shares
        aside = [(r.work.flow.tenant, id(r.work)) for r in (self.parked.rows if self.parked else [])]
        lights = light_tenants(owners, shares, aside)
        alone = sum(1 for tenant, _ in owners if tenant in lights)
        most = self.costs.rows_within(
            self.settings.fair_step_slowdown, max(1, alone), self.settings.max_batch_size
        )
        return step_shares(owners, shares, most, lights)

    def _rebalance(self) -> None:
        """Set rows aside, or let them rejoin, as :func:`rows_to_set_aside` and :func:`light`
        decide (fair scheduling)."""
        running, parked = self.running, self.parked
        owners = [(r.work.flow.tenant, id(r.work)) for r in (running.rows if running is not None else [])]
        shares = self._shares()
        limits = self._limits(owners, shares)
        if parked is not None:
            if not light(owners, shares):
                self.parked = None
                parked.drop_cancelled()
                if running is None or not running.rows:
                    self.running = parked if parked.rows else None
                elif parked.rows:
                    running.extend(parked)
            elif running is not None and running.rows:
                back = rows_to_bring_back(
                    owners, [(r.work.flow.tenant, id(r.work)) for r in parked.rows], limits
                )
                if len(back) == len(parked.rows):
                    self.parked = None
                    running.extend(parked)
                elif back:
                    running.extend(parked.split(back))
                elif kv_cache.mergeable(running.cache):
                    self._set_aside(owners, shares, limits)
            return
        if running is None or not kv_cache.mergeable(running.cache):
            return
        self._set_aside(owners, shares, limits)

    def _set_aside(
        self, owners: list[tuple[str, int]], shares: dict[str, float], limits: dict[str, float]
    ) -> None:
        running = self.running
        assert running is not None
        index = rows_to_set_aside(owners, shares, headroom(self.settings.max_batch_size), limits)
        if not index:
            return
        for i in index:
            self.metrics.tenant_set_aside.labels(tenant=running.rows[i].work.flow.tenant).inc()
        aside = running.split(index)
        if self.parked is None:
            self.parked = aside
        else:
            self.parked.extend(aside)
        if not running.rows:
            self.running = None

    def _start_prefill(self, admission: Admission) -> GenerationBatch | None:
        """Take waiting requests in fair order while the batch has room, as device room and the
        prefill budget allow; with fair scheduling, as :func:`fair_turn` decides."""
        pairs: list[tuple[GenerateWork, list[int]]] = []
        taken: list[tuple[int, int]] = []  # each row's prompt and cached tokens
        if any(w.cancelled for w in self.queue):
            self.queue.remove_if(lambda w: w.cancelled)
        limit = self.settings.max_batch_size
        by_tenant: dict[str, int] = {}
        for row in (r for b in self.batches() for r in b.rows):
            by_tenant[row.work.flow.tenant] = by_tenant.get(row.work.flow.tenant, 0) + 1
        running = sum(by_tenant.values())
        shares: dict[str, float] | None = None
        full: set[str] = set()  # tenants that cannot join now
        while (work := self.queue.peek(full)) is not None:
            need, tenant = len(work.rows), work.flow.tenant
            # (the API side bounds an ensemble by MAX_BATCH_SIZE)
            if not self.queue.fair and running + len(taken) + need > limit:
                break
            if self.queue.fair and running + len(taken) + need > limit - headroom(limit):
                if shares is None:
                    waiting = {w.flow.tenant: w.flow.weight for w in self.queue}
                    shares = row_shares(by_tenant, waiting, limit)
                turn = fair_turn(tenant, need, by_tenant, shares, running + len(taken), limit)
                if turn == "stop":
                    break
                if turn == "wait":
                    full.add(tenant)
                    continue
            cached = min(self.prefix.cached_tokens(m.uid, work.prompt) for m in work.rows)
            if not prefill_fits(taken, len(work.prompt), cached, self.settings.max_prefill_tokens, need):
                break
            slots: list[int | None] = []
            for member in work.rows:
                version, weights = member.version, member.weights
                if version is None:
                    slots.append(BASE_SLOT)
                    continue
                assert weights is not None, "an adapter's work carries its weights"
                try:
                    slots.append(admission.admit(version, weights))
                except RuntimeError:  # a device error (out of memory) copying the weights in
                    log.exception("loading adapter %s failed", version.name)
                    slots = []
                    break
            if not slots:
                self.queue.pop(full)
                fail_rows([work], EngineFailure("loading the adapter failed; see the server log"))
                continue
            if None in slots:
                break
            self.queue.pop(full)
            pairs.append((work, [s for s in slots if s is not None]))
            taken += [(len(work.prompt), cached)] * need
            by_tenant[tenant] = by_tenant.get(tenant, 0) + need
        if not pairs:
            return None
        self.metrics.batch_size.labels(task="prefill").observe(len(taken))
        return GenerationBatch.start(self.runner, pairs, self._decode, self.prefix)

    def _advance_prefill(self) -> None:
        """One chunk of the prefill; when it completes, its rows join the running batch."""
        batch = self.prefill
        assert batch is not None
        try:
            finished = batch.prefill_chunk(self.settings.max_prefill_tokens)
        except Exception as exc:  # any failure of the forward fails its batch; the engine goes on
            self.prefill = None
            works = [row.work for row in batch.rows]
            self.runner.health.batch_failed(exc, "prefill", lambda e: fail_rows(works, e))
            return
        self.runner.health.succeeded()
        if finished is None:
            return
        self.prefill = None
        self._finish(finished)
        batch.drop_cancelled()
        if not batch.rows:
            return
        if self.running is None:
            self.running = batch
        else:
            self.running.extend(batch)

    def _finish(self, finished: Finished) -> None:
        now = time.monotonic()
        m = self.metrics
        for work, result in finished:
            # counted and charged before the answer, so the client's next request sees both
            n = len(result.token_ids)
            self._charge(work.flow, result.prompt_tokens, n)
            m.generated_tokens.labels(adapter=m.adapter_label(work.metric_name)).inc(n)
            if work.first_token_at is not None:
                m.time_to_first_token.observe(work.first_token_at - work.enqueued_at)
                if n > 1:
                    m.time_per_output_token.observe((now - work.first_token_at) / (n - 1))
            if not work.future.done():
                work.future.set_result(result)


def fail_rows(works: list[GenerateWork], exc: AdapterServeError) -> None:
    """Fail these requests (streams get an error event)."""
    for work in works:
        if not work.future.done():
            work.future.set_exception(exc)
            if work.sink is not None:
                work.sink(StreamDelta(text="", error=exc))
