"""One Prometheus registry per service instance and every metric the service exports."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIERS = ("host", "device")
BASE_LABEL = "base"
OTHER_LABEL = "other"


class Metrics:
    """Metric objects with the ``adapterserve_`` prefix, registered in a private registry."""

    def __init__(self, max_adapter_labels: int = 100) -> None:
        # no ``*_created`` series: they double the exposition and no dashboard or rule reads them
        # (a process-wide switch of prometheus-client; this service has one metrics registry)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        r = self.registry
        self.requests = Counter(
            "adapterserve_requests_total", "HTTP requests", ["endpoint", "adapter", "status"], registry=r
        )
        self.tenant_requests = Counter(
            "adapterserve_tenant_requests_total",
            "HTTP requests per tenant (the tenants file's names; 'default' without one)",
            ["tenant", "status"],
            registry=r,
        )
        self.tenant_request_duration = Histogram(
            "adapterserve_tenant_request_duration_seconds",
            "inference request latency per tenant (until the response or, streamed, its headers)",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_tokens = Counter(
            "adapterserve_tenant_tokens_total",
            "tokens per tenant: kind=prompt (prompts and classified texts) or generated",
            ["tenant", "kind"],
            registry=r,
        )
        self.tenant_queue_depth = Gauge(
            "adapterserve_tenant_queue_depth",
            "requests of a tenant waiting for the engine",
            ["tenant"],
            registry=r,
        )
        self.tenant_rejections = Counter(
            "adapterserve_tenant_rejections_total",
            "requests refused at a tenant's limit: requests, tokens, concurrent, queue (its share)",
            ["tenant", "limit"],
            registry=r,
        )
        self.tenant_set_aside = Counter(
            "adapterserve_tenant_rows_set_aside_total",
            "generation rows of a tenant over its share set aside while a lighter tenant decoded",
            ["tenant"],
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "adapterserve_prefix_cache_queries_total",
            "prefix cache lookups (one per generation row)",
            registry=r,
        )
        self.prefix_cache_query_tokens = Counter(
            "adapterserve_prefix_cache_query_tokens_total",
            "prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            "adapterserve_prefix_cache_hit_tokens_total",
            "prompt tokens taken from the prefix cache instead of prefilled",
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "adapterserve_prefix_cache_bytes", "bytes of keys and values in the prefix cache", registry=r
        )
        self.prefix_cache_evictions = Counter(
            "adapterserve_prefix_cache_evictions_total",
            "prefix cache entries dropped for room (least recently used first)",
            registry=r,
        )
        # the model server protocol of the Kubernetes Gateway API Inference Extension (docs/tenants.md)
        self.requests_waiting = Gauge(
            "adapterserve_num_requests_waiting", "requests queued for the engine", registry=r
        )
        self.requests_running = Gauge(
            "adapterserve_num_requests_running", "requests in a running batch (generation rows)", registry=r
        )
        self.kv_cache_usage = Gauge(
            "adapterserve_kv_cache_usage_perc",
            "fraction (0-1) of the generation batch's rows (MAX_BATCH_SIZE) in use",
            registry=r,
        )
        self.lora_requests_info = Gauge(
            "adapterserve_lora_requests_info",
            "adapters of running and waiting requests, as vLLM's lora_requests_info (value: when updated)",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.request_duration = Histogram(
            "adapterserve_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("adapterserve_queue_depth", "requests waiting for the engine", registry=r)
        self.batch_size = Histogram(
            "adapterserve_batch_size", "rows per forward batch", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "adapterserve_time_to_first_token_seconds",
            "queueing + prefill until the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "adapterserve_time_per_output_token_seconds",
            "decode time per generated token after the first",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2),
            registry=r,
        )
        self.generated_tokens = Counter(
            "adapterserve_generated_tokens_total", "tokens generated", ["adapter"], registry=r
        )
        # adapter tiers: store (disk) -> host memory -> device slots
        self.adapter_loads = Counter(
            "adapterserve_adapter_loads_total", "adapter loads into a tier", ["tier"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "adapterserve_adapter_load_seconds",
            "time to load an adapter into a tier (host: read + validate; device: copy into slots)",
            ["tier"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.adapter_evictions = Counter(
            "adapterserve_adapter_evictions_total", "adapters evicted from a tier", ["tier"], registry=r
        )
        self.adapters_resident = Gauge(
            "adapterserve_adapters_resident", "adapters resident in a tier", ["tier"], registry=r
        )
        self.adapter_resident_bytes = Gauge(
            "adapterserve_adapter_resident_bytes",
            "bytes of adapter weights resident in a tier",
            ["tier"],
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "adapterserve_adapter_load_failures_total",
            "stored adapters that could not be read or validated when a request needed them",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "adapterserve_queue_capacity", "queued requests accepted before 503 (MAX_QUEUE)", registry=r
        )
        self.forward_failures = Counter(
            "adapterserve_forward_failures_total",
            "forward batches that failed (their requests were answered 500)",
            ["task"],
            registry=r,
        )
        self.adapter_bank_bytes = Gauge(
            "adapterserve_adapter_bank_bytes",
            "device memory allocated for the adapter slot banks (ranks padded per layer)",
            registry=r,
        )

        self.base_weight_bytes = Gauge(
            "adapterserve_base_weight_bytes",
            "bytes of the base model's weights in memory (after quantization, embeddings included)",
            registry=r,
        )
        self.adapter_merges = Counter(
            "adapterserve_adapter_merges_total",
            "merged adapters computed (a composition's first use, or after a member changed)",
            registry=r,
        )
        self.adapter_merge_seconds = Histogram(
            "adapterserve_adapter_merge_seconds",
            "time to merge a composition's LoRA members into one adapter",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.composition_duration = Histogram(
            "adapterserve_composition_request_duration_seconds",
            "latency of requests that use a composition (named: its name; by request: 'ad-hoc')",
            ["endpoint", "composition"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.store_last_sync = Gauge(
            "adapterserve_store_last_sync_timestamp_seconds",
            "when this replica last completed a sync with the adapter store (unix time)",
            registry=r,
        )
        self.store_sync_seconds = Histogram(
            "adapterserve_store_sync_seconds",
            "duration of one sync with the adapter store",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.store_sync_errors = Counter(
            "adapterserve_store_sync_errors", "syncs with the adapter store that failed", registry=r
        )
        self.store_generation = Gauge(
            "adapterserve_store_generation",
            "sum of the store versions (deletions included) this replica has seen; equal on every "
            "replica once they agree",
            registry=r,
        )

        for tier in TIERS:  # every tier's series exists from the start (rates read 0, not "no data")
            for family in (self.adapter_loads, self.adapter_evictions, self.adapters_resident):
                family.labels(tier=tier)
            self.adapter_resident_bytes.labels(tier=tier)
        for task in ("classify", "generate"):
            self.batch_size.labels(task=task)
        for task in ("classify", "prefill", "generate"):
            self.forward_failures.labels(task=task)

    def adapter_label(self, name: str | None) -> str:
        """A bounded ``adapter`` label: the first N names seen keep their own series, the rest 'other'."""
        if name is None:
            return BASE_LABEL
        if name in self._adapter_labels:
            return name
        if len(self._adapter_labels) < self.max_adapter_labels:
            self._adapter_labels.add(name)
            return name
        return OTHER_LABEL

    def render(self) -> bytes:
        return generate_latest(self.registry)
