"""The gauges that describe the engine's state: the queue per tenant, the prefix cache and the
inference gateway's series (reported by the engine thread, every few seconds and when it goes idle)."""

from __future__ import annotations

import time

from app.config import Settings
from app.engine.classification_lane import ClassificationLane
from app.engine.generation_lane import GenerationLane
from app.engine.queue_shares import QueueShares
from app.metrics import Metrics


def report_gauges(
    m: Metrics,
    settings: Settings,
    shares: QueueShares,
    classification: ClassificationLane,
    gen: GenerationLane,
    queue_depth: int,
) -> None:
    shares.report()
    gen.prefix.report(m)
    rows = [row.work for b in gen.batches() for row in b.rows]
    running = list({id(w): w for w in rows}.values())
    m.requests_waiting.set(queue_depth)
    m.requests_running.set(len(running))
    m.kv_cache_usage.set(min(1.0, len(rows) / settings.max_batch_size))
    queued = [w.flow.adapter for w in (*classification.queue, *gen.queue) if w.flow.adapter]
    m.lora_requests_info.clear()
    m.lora_requests_info.labels(
        running_lora_adapters=",".join(sorted({w.flow.adapter for w in running if w.flow.adapter})),
        waiting_lora_adapters=",".join(sorted(set(queued) - {w.flow.adapter for w in running})),
        max_lora=str(settings.max_device_adapters),
    ).set(time.time())
