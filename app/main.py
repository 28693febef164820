"""Application factory: the lifespan loads the base model, scans the store and starts the engine."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from app import __version__
from app.adapters.archive import ArchiveLimits
from app.adapters.catalog import AdapterCatalog
from app.adapters.intake import Intake
from app.adapters.store import open_store
from app.api import adapters, admin, health, inference, openai, ui
from app.api.responses import drop_validation_422
from app.config import Settings
from app.engine.engine import Engine
from app.errors import NotReady, is_openai_path, register_error_handlers, to_response
from app.logs import REQUEST_ID_HEADER, log_request, request_id
from app.metrics import Metrics
from app.models.base_lm import BaseLM, load_base_model
from app.platform import ReleasingExecutor, capability
from app.quotas import TenantQuotas, Ticket
from app.serving.embeddings import EmbeddingService
from app.serving.openai_service import OpenAIService
from app.serving.service import InferenceService
from app.tenants import TenantDirectory

log = logging.getLogger(__name__)
_UNMEASURED = {"/metrics"}
_ALWAYS_OPEN = {"/metrics", "/healthz", "/readyz"}
# the routes whose requests run on an adapter: only their requests carry an ``adapter`` label
# (other routes get the empty value, which PromQL treats as no label)
INFERENCE_ROUTES = frozenset({"/classify", "/generate", "/v1/completions", "/v1/chat/completions"})
RECLAIM_EVERY_S = 60.0  # how often a replica looks for superseded files to remove


def _route_path(request: Request) -> str:
    """The matched route's template (``/v1/adapters/{name}``), known once routing ran: a bounded
    ``endpoint`` label whatever the path; ``unmatched`` for paths no route serves."""
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def _install_request_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Per request: the request id (``X-Request-ID`` in and out), metrics and the request log."""

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        request.state.request_id = rid
        if app.state.draining and request.url.path not in _ALWAYS_OPEN:  # shutting down: admit nothing
            message = "the server is shutting down; retry on another replica"
            response: Response = to_response(NotReady(message), is_openai_path(request.url.path))
            response.headers[REQUEST_ID_HEADER] = rid
            return response
        if request.url.path in _UNMEASURED:
            response = await call_next(request)
            response.headers[REQUEST_ID_HEADER] = rid
            return response
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers[REQUEST_ID_HEADER] = rid
            ticket: Ticket | None = getattr(request.state, "ticket", None)
            if ticket is not None:  # a tenant with limits: its headers; its slot ends with the body
                response.headers.update(ticket.headers)
                body = response.body_iterator  # type: ignore[attr-defined]
                response.body_iterator = released_after(body, ticket)  # type: ignore[attr-defined]
            return response
        except BaseException:
            ticket = getattr(request.state, "ticket", None)
            if ticket is not None:
                ticket.release()
            raise
        finally:
            endpoint = _route_path(request)
            adapter = getattr(request.state, "adapter", None)
            label = _adapter_label(request, metrics, adapter) if endpoint in INFERENCE_ROUTES else ""
            elapsed = time.perf_counter() - start
            metrics.requests.labels(endpoint=endpoint, adapter=label, status=str(status)).inc()
            metrics.request_duration.labels(endpoint=endpoint).observe(elapsed)
            composition = _composition_label(request, label, adapter)
            if composition is not None:
                metrics.composition_duration.labels(endpoint=endpoint, composition=composition).observe(
                    elapsed
                )
            tenant = getattr(getattr(request.state, "tenant", None), "name", None)
            if tenant is not None:
                metrics.tenant_requests.labels(tenant=tenant, status=str(status)).inc()
                if endpoint in INFERENCE_ROUTES:
                    metrics.tenant_request_duration.labels(tenant=tenant).observe(elapsed)
            error = getattr(request.state, "error", None)
            asked = adapter if adapter is not None else getattr(request.state, "asked", None)
            log_request(rid, request.method, endpoint, status, asked, elapsed, tenant, error)


def released_after(body: AsyncIterator[bytes], ticket: Ticket) -> AsyncIterator[bytes]:
    """The response body; the request's concurrency slot is given back when it ends, fails, or is
    dropped without ever being iterated (the client gone before it started)."""

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            ticket.release()

    wrapped = chunks()
    weakref.finalize(wrapped, ticket.release)
    return wrapped


def _adapter_label(request: Request, metrics: Metrics, adapter: str | None) -> str:
    """The bounded ``adapter`` label of an inference request: its adapter or named composition,
    ``base``, ``ad-hoc`` for a composition given in the request, or ``unknown`` for a name the
    store does not hold (404s must not create a series per made-up name)."""
    if adapter is not None and "+" in adapter:  # adapter names have no '+'
        return "ad-hoc"
    catalog: AdapterCatalog | None = getattr(request.app.state, "catalog", None)
    known = adapter is not None and (
        catalog is not None and (adapter in catalog or catalog.composition(adapter) is not None)
    )
    return metrics.adapter_label(adapter) if (known or adapter is None) else "unknown"


def _composition_label(request: Request, label: str, adapter: str | None) -> str | None:
    """The ``composition`` label of a request that used one: a named composition's (bounded) label,
    'ad-hoc' for one given in the request (members joined by '+'), None otherwise."""
    if adapter is None:
        return None
    if "+" in adapter:  # adapter names have no '+'
        return "ad-hoc"
    catalog: AdapterCatalog | None = getattr(request.app.state, "catalog", None)
    return label if catalog is not None and catalog.composition(adapter) is not None else None


async def keep_in_sync(catalog: AdapterCatalog, settings: Settings, metrics: Metrics) -> None:
    """Adopt the store's changes every ``STORE_SYNC_INTERVAL_S`` (versions, deletions, fleet-wide
    pins, named compositions); reclaim superseded files now and then. A failed sync (the store
    unreachable) is logged and counted; the next one retries."""
    reclaimed_at = time.monotonic()
    while True:
        await asyncio.sleep(settings.store_sync_interval_s)
        try:
            await catalog.follow_store()
            if time.monotonic() - reclaimed_at > RECLAIM_EVERY_S:
                reclaimed_at = time.monotonic()
                await asyncio.to_thread(catalog.store.reclaim, settings.store_reclaim_grace_s)
        except Exception:  # any failure of the store: keep serving what is known
            metrics.store_sync_errors.inc()
            log.exception("sync with the adapter store %s failed", settings.store)


def create_app(settings: Settings | None = None, base: BaseLM | None = None) -> FastAPI:
    """Build the app. ``base`` lets a caller reuse an already loaded base model (tests, benchmarks)."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_adapter_labels)
    metrics.queue_capacity.set(settings.max_queue)
    quotas = TenantQuotas(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # helper threads give their OpenMP teams back after each job (app/platform.py)
        asyncio.get_running_loop().set_default_executor(
            ReleasingExecutor(thread_name_prefix="adapterserve-io")
        )
        model = base
        if model is None:
            model = await asyncio.to_thread(
                load_base_model,
                settings.base_model,
                settings.cache_dir,
                settings.device,
                settings.dtype,
                settings.quantization,
            )
        store = await asyncio.to_thread(open_store, settings)
        limits = ArchiveLimits(
            max_members=settings.max_archive_members, max_total_bytes=2 * settings.max_upload_bytes
        )
        engine = Engine(model, settings, metrics)
        engine.charge_tokens = quotas.charge
        host_budget = settings.host_adapter_bytes()
        intake = Intake(
            store,
            model.spec,
            settings.max_lora_rank,
            limits,
            budget=min(host_budget, settings.device_adapter_bytes(model.device)),
            metrics=metrics,
        )
        catalog = AdapterCatalog(
            intake,
            engine,
            metrics,
            host_budget=host_budget,
            pin_limit=settings.max_device_adapters - 1,
            pinned=settings.pin_names,
            ensemble_rows=min(settings.max_batch_size, settings.max_device_adapters),
        )
        await asyncio.to_thread(catalog.scan)
        for option, names in (("PRELOAD", settings.preload_names), ("PIN", settings.pin_names)):
            missing = [name for name in names if name not in catalog]
            if missing:
                raise RuntimeError(
                    f"ADAPTERSERVE_{option} names adapters that are not in the store: {missing}"
                )
        engine.start()
        for name in settings.pin_names:
            await catalog.pin(name)
        for name in settings.preload_names:
            if name not in settings.pin_names:
                await catalog.load_on_device(name)
        app.state.model_id = model.spec.model_id
        app.state.quantization = model.quantization
        metrics.base_weight_bytes.set(model.weight_bytes)
        app.state.catalog = catalog
        app.state.engine = engine
        cannot_generate = (
            ""
            if model.surface.can_generate
            else f"the base model {model.spec.model_id!r} ({model.surface.family}) is an encoder: it "
            "serves POST /classify and POST /embed only, it cannot generate text"
        )
        app.state.service = service = InferenceService(
            settings, catalog, engine, model.tokenizer, model.spec.max_context, cannot_generate
        )
        app.state.openai = OpenAIService(service, catalog, model.spec.model_id, model.quantization)
        app.state.embeddings = EmbeddingService(service, model.spec.model_id)
        syncing = asyncio.create_task(keep_in_sync(catalog, settings, metrics))
        log.info(
            "adapterserve ready: %d adapters in %s; machine: %s",
            len(catalog.adapters()),
            settings.store,
            capability().line(),
        )
        try:
            yield
        finally:
            syncing.cancel()
            app.state.service = app.state.openai = app.state.embeddings = None
            await asyncio.to_thread(engine.stop, settings.shutdown_grace_s)

    app = FastAPI(title="adapterserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False  # set on SIGTERM (app.cli): new requests get 503, readiness fails
    app.state.engine = app.state.catalog = app.state.service = app.state.openai = None
    app.state.embeddings = None
    # the tenants file is read now: a file that does not parse stops the start
    app.state.tenants = TenantDirectory(settings.tenants_file) if settings.tenants_file else None
    app.state.quotas = quotas
    register_error_handlers(app)
    openapi = app.openapi
    app.openapi = lambda: drop_validation_422(openapi(), is_openai_path)  # type: ignore[method-assign]
    _install_request_metrics(app, metrics)
    for module in (inference, openai, adapters, admin, health):
        app.include_router(module.router)
    if settings.ui:
        app.include_router(ui.router)
    return app
