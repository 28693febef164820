"""The adapterserve Grafana dashboard, generated with grafanalib.

    .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/dashboards/adapterserve.json

Every panel's PromQL is in ``PANELS`` (also read by the test that evaluates it against a real
Prometheus). ``$__rate_interval`` is Grafana's rate window; ``$adapter`` filters by adapter; the
row of ``TENANT_PANELS`` is repeated for each tenant of ``$tenant``.
"""

from __future__ import annotations

import json
import sys

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    Repeat,
    RowPanel,
    Target,
    Template,
    Templating,
    TimeSeries,
)

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
REQ = "adapterserve_requests_total"
INFERENCE = "/classify|/generate|/v1/chat/completions|/v1/completions"
ADAPTER = 'adapter=~"$adapter"'


def _q(le: str, metric: str, by: str = "", filt: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({le}, sum by ({group}) (rate({metric}_bucket{{{filt}}}[{RATE}])))"


# title -> (unit, [(legend, expr)], description)
PANELS: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "Request rate by endpoint": (
        "reqps",
        [("{{endpoint}}", f"sum by (endpoint) (rate({REQ}[{RATE}]))")],
        "HTTP requests per second on every route (/metrics excluded).",
    ),
    "Request rate by adapter": (
        "reqps",
        [("{{adapter}}", f'sum by (adapter) (rate({REQ}{{endpoint=~"{INFERENCE}", {ADAPTER}}}[{RATE}]))')],
        "Inference requests per second per adapter (base = no adapter, other = beyond the label limit).",
    ),
    "Error ratio by endpoint (5xx)": (
        "percentunit",
        [
            (
                "{{endpoint}}",
                f'(sum by (endpoint) (rate({REQ}{{status=~"5.."}}[{RATE}])) '
                f"or sum by (endpoint) (rate({REQ}[{RATE}])) * 0) "
                f"/ sum by (endpoint) (rate({REQ}[{RATE}]))",
            )
        ],
        "Share of requests answered 5xx (queue full 503, deadline 504, engine errors 500).",
    ),
    "Client errors by adapter (4xx)": (
        "reqps",
        [
            (
                "{{adapter}} {{status}}",
                f'sum by (adapter, status) (rate({REQ}{{status=~"4..", {ADAPTER}}}[{RATE}]))',
            )
        ],
        "Refused requests per second: unknown adapter, task mismatch, invalid input, auth.",
    ),
    "Latency p50 / p95 / p99 by endpoint": (
        "s",
        [
            (
                f"p{int(float(q) * 100)} {{{{endpoint}}}}",
                _q(q, "adapterserve_request_duration_seconds", "endpoint"),
            )
            for q in ("0.5", "0.95", "0.99")
        ],
        "Request latency quantiles from the request-duration histogram.",
    ),
    "Time to first token": (
        "s",
        [
            (f"p{int(float(q) * 100)}", _q(q, "adapterserve_time_to_first_token_seconds"))
            for q in ("0.5", "0.99")
        ],
        "Queueing + prefill until a generation's first token.",
    ),
    "Time per output token": (
        "s",
        [
            (f"p{int(float(q) * 100)}", _q(q, "adapterserve_time_per_output_token_seconds"))
            for q in ("0.5", "0.99")
        ],
        "Decode time per generated token after the first.",
    ),
    "Generated tokens/s by adapter": (
        "short",
        [
            (
                "{{adapter}}",
                f"sum by (adapter) (rate(adapterserve_generated_tokens_total{{{ADAPTER}}}[{RATE}]))",
            )
        ],
        "Tokens generated per second.",
    ),
    "Queue depth": (
        "short",
        [("queued", "adapterserve_queue_depth"), ("capacity", "adapterserve_queue_capacity")],
        "Requests waiting for the engine, against MAX_QUEUE (503 beyond it).",
    ),
    "Batch size by task": (
        "short",
        [
            ("p50 {{task}}", _q("0.5", "adapterserve_batch_size", "task")),
            (
                "mean {{task}}",
                f"sum by (task) (rate(adapterserve_batch_size_sum[{RATE}])) "
                f"/ sum by (task) (rate(adapterserve_batch_size_count[{RATE}]))",
            ),
        ],
        "Rows per forward pass (classification batches, generation steps).",
    ),
    "Failed forwards by task": (
        "ops",
        [("{{task}}", f"sum by (task) (rate(adapterserve_forward_failures_total[{RATE}]))")],
        "Forward batches that failed (their requests got 500; serving goes on). "
        "MAX_CONSECUTIVE_FAILURES in a row stop the engine and turn /readyz false.",
    ),
    "Adapters resident by tier": (
        "short",
        [("{{tier}}", "adapterserve_adapters_resident")],
        "Adapters in the store, in host memory and in device slots.",
    ),
    "Adapter bytes by tier": (
        "bytes",
        [
            ("{{tier}}", "adapterserve_adapter_resident_bytes"),
            ("slot banks", "adapterserve_adapter_bank_bytes"),
        ],
        "Adapter weights per tier, and the device memory of the slot banks.",
    ),
    "Adapter loads and evictions": (
        "ops",
        [
            ("loads {{tier}}", f"sum by (tier) (rate(adapterserve_adapter_loads_total[{RATE}]))"),
            ("evictions {{tier}}", f"sum by (tier) (rate(adapterserve_adapter_evictions_total[{RATE}]))"),
            ("load failures", f"sum(rate(adapterserve_adapter_load_failures_total[{RATE}]))"),
            ("merges", f"sum(rate(adapterserve_adapter_merges_total[{RATE}]))"),
        ],
        "Loads into host memory and device slots, LRU evictions, stored adapters that failed to load, "
        "and merged adapters computed (a merge composition's first use, or after a member changed).",
    ),
    "Composition requests and latency": (
        "reqps",
        [
            (
                "{{composition}} {{endpoint}}",
                "sum by (composition, endpoint) "
                f"(rate(adapterserve_composition_request_duration_seconds_count[{RATE}]))",
            ),
        ],
        "Requests per second that use a composition: a named one by its name, one given in the "
        "request (`adapters`) as ad-hoc. Their latency is the next panel.",
    ),
    "Composition latency p95": (
        "s",
        [
            (
                "{{composition}}",
                _q("0.95", "adapterserve_composition_request_duration_seconds", "composition"),
            )
        ],
        "An ensemble of K members runs K rows per input or per generated token; a merge costs one "
        "adapter's rows once merged.",
    ),
    "Store sync lag by replica": (
        "s",
        [
            ("{{instance}}", "time() - adapterserve_store_last_sync_timestamp_seconds"),
            ("sync p99 {{instance}}", _q("0.99", "adapterserve_store_sync_seconds", "instance")),
        ],
        "Seconds since each replica last adopted the store's changes (about STORE_SYNC_INTERVAL_S when "
        "healthy; growing when the store is unreachable), and how long one sync takes.",
    ),
    "Store versions by replica": (
        "short",
        [
            ("{{instance}}", "adapterserve_store_generation"),
            (
                "sync errors {{instance}}",
                f"sum by (instance) (rate(adapterserve_store_sync_errors_total[{RATE}]))",
            ),
        ],
        "Sum of the store versions each replica has seen: the lines meet when every replica agrees "
        "on the store; failed syncs per second.",
    ),
    "Adapter load time p99 by tier": (
        "s",
        [("{{tier}}", _q("0.99", "adapterserve_adapter_load_seconds", "tier"))],
        "Host: read + validate from the store; device: copy into the slot banks.",
    ),
    "Prefix cache hit rate": (
        "percentunit",
        [
            (
                "{{instance}}",
                f"sum by (instance) (rate(adapterserve_prefix_cache_hit_tokens_total[{RATE}])) / "
                f"sum by (instance) (rate(adapterserve_prefix_cache_query_tokens_total[{RATE}]))",
            )
        ],
        "Of the prompt tokens of generations, the share taken from the prefix cache instead of "
        "prefilled (docs/prefix-cache.md): a chatbot's later turns should be mostly cached.",
    ),
    "Prefix cache memory and evictions": (
        "bytes",
        [
            ("bytes {{instance}}", "sum by (instance) (adapterserve_prefix_cache_bytes)"),
            (
                "evicted/s {{instance}}",
                f"sum by (instance) (rate(adapterserve_prefix_cache_evictions_total[{RATE}]))",
            ),
        ],
        "Keys and values held (bytes; at most ADAPTERSERVE_PREFIX_CACHE_BYTES) and prefixes dropped "
        "for room per second (many: the budget is too small for the conversations in flight).",
    ),
}


TENANT = 'tenant=~"$tenant"'
# one row per tenant (repeated over $tenant): title -> (unit, [(legend, expr)], description)
TENANT_PANELS: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "Requests by status": (
        "reqps",
        [("{{status}}", f"sum by (status) (rate(adapterserve_tenant_requests_total{{{TENANT}}}[{RATE}]))")],
        "The tenant's HTTP requests per second by status (429: over a limit or its queue share).",
    ),
    "Tokens per second": (
        "short",
        [("{{kind}}", f"sum by (kind) (rate(adapterserve_tenant_tokens_total{{{TENANT}}}[{RATE}]))")],
        "Prompt (and classified) tokens and generated tokens per second: what tokens_per_minute counts.",
    ),
    "Rejections by limit": (
        "reqps",
        [
            (
                "{{limit}}",
                f"sum by (limit) (rate(adapterserve_tenant_rejections_total{{{TENANT}}}[{RATE}])) "
                f"or sum(rate(adapterserve_tenant_requests_total{{{TENANT}}}[{RATE}])) * 0",
            )
        ],
        "Requests per second refused at a limit: requests, tokens, concurrent, queue (its share of "
        "MAX_QUEUE). A tenant held at its limit raises AdapterserveTenantAtLimit.",
    ),
    "Queue and latency": (
        "s",
        [
            ("waiting", f"sum(adapterserve_tenant_queue_depth{{{TENANT}}})"),
            ("p50", _q("0.5", "adapterserve_tenant_request_duration_seconds", "", TENANT)),
            ("p95", _q("0.95", "adapterserve_tenant_request_duration_seconds", "", TENANT)),
        ],
        "Requests of the tenant waiting for the engine (count), and its inference latency (seconds).",
    ),
}


def _panel(
    title: str, unit: str, queries: list[tuple[str, str]], description: str, pos: GridPos
) -> TimeSeries:
    targets = [
        Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + j), datasource=DATASOURCE)
        for j, (legend, expr) in enumerate(queries)
    ]
    return TimeSeries(
        title=title, description=description, dataSource=DATASOURCE, targets=targets, unit=unit, gridPos=pos
    )


def _label_variable(label: str, metric: str) -> Template:
    """A multi-select variable over the values of ``label`` in ``metric`` ("All" = every value)."""
    return Template(
        name=label,
        label=label,
        query=f"label_values({metric}, {label})",
        dataSource=DATASOURCE,
        includeAll=True,
        multi=True,
        allValue=".*",
        default="All",
        refresh=2,
    )


def dashboard() -> Dashboard:
    panels: list[TimeSeries | RowPanel] = []
    for i, (title, (unit, queries, description)) in enumerate(PANELS.items()):
        pos = GridPos(h=8, w=12, x=12 * (i % 2), y=8 * (i // 2))
        panels.append(_panel(title, unit, queries, description, pos))
    top = 8 * ((len(PANELS) + 1) // 2)
    panels.append(
        RowPanel(
            title="Tenant $tenant", repeat=Repeat(variable="tenant"), gridPos=GridPos(h=1, w=24, x=0, y=top)
        )
    )
    for i, (title, (unit, queries, description)) in enumerate(TENANT_PANELS.items()):
        pos = GridPos(h=8, w=6, x=6 * i, y=top + 1)
        panels.append(_panel(f"{title} ($tenant)", unit, queries, description, pos))
    return Dashboard(
        title="adapterserve",
        uid="adapterserve",
        description="Requests, latency, generation, queueing and adapter tiers of adapterserve",
        tags=["adapterserve"],
        timezone="browser",
        refresh="10s",
        panels=panels,
        templating=Templating(
            list=[
                _label_variable("adapter", "adapterserve_requests_total"),
                _label_variable("tenant", "adapterserve_tenant_requests_total"),
            ]
        ),
    ).auto_panel_ids()


def render() -> str:
    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
