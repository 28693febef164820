"""Application factory: the lifespan loads the base model, scans the store and starts the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__, kernels
from app.adapters.archive import ArchiveLimits
from app.adapters.catalog import AdapterCatalog
from app.adapters.intake import Intake
from app.adapters.store import open_store
from app.api import adapters, admin, health, inference, openai, ui
from app.api.middleware import RequestMiddleware
from app.api.responses import drop_validation_422
from app.config import Settings
from app.engine.engine import Engine
from app.errors import is_openai_path, register_error_handlers
from app.metrics import Metrics
from app.models.base_lm import BaseLM, load_base_model
from app.platform import ReleasingExecutor, capability
from app.quotas import TenantQuotas
from app.serving.embeddings import EmbeddingService
from app.serving.openai_service import OpenAIService
from app.serving.service import InferenceService
from app.tenants import TenantDirectory

log = logging.getLogger(__name__)
RECLAIM_EVERY_S = 60.0  # how often a replica looks for superseded files to remove


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
        kernels.configure(settings.cache_dir, settings.native_kernels)
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
    app.add_middleware(RequestMiddleware, metrics=metrics)
    for module in (inference, openai, adapters, admin, health):
        app.include_router(module.router)
    if settings.ui:
        app.include_router(ui.router)
    return app
