"""Typed dependencies: the service objects live on ``app.state``, set up by the lifespan.

Every dependency is ``async`` (none blocks): FastAPI runs a plain ``def`` dependency on a worker
thread, a hop per dependency and request."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.adapters.catalog import AdapterCatalog
from app.config import Settings
from app.engine.engine import Engine
from app.errors import AdminDisabled, Forbidden, NotReady, Unauthorized
from app.quotas import TenantQuotas
from app.serving.embeddings import EmbeddingService
from app.serving.service import InferenceService
from app.tenants import EVERYONE, Limits, Tenant, TenantDirectory


def state(request: Request, name: str) -> object:
    """A service object of the running app (503 while the lifespan is still starting)."""
    value = getattr(request.app.state, name, None)
    if value is None:
        raise NotReady("the service is starting; retry shortly")
    return value


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_catalog(request: Request) -> AdapterCatalog:
    return state(request, "catalog")  # type: ignore[return-value]


async def get_service(request: Request) -> InferenceService:
    return state(request, "service")  # type: ignore[return-value]


async def get_engine(request: Request) -> Engine:
    return state(request, "engine")  # type: ignore[return-value]


async def get_embeddings(request: Request) -> EmbeddingService:
    return state(request, "embeddings")  # type: ignore[return-value]


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[AdapterCatalog, Depends(get_catalog)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
EngineDep = Annotated[Engine, Depends(get_engine)]
EmbeddingsDep = Annotated[EmbeddingService, Depends(get_embeddings)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _tenants(request: Request) -> TenantDirectory | None:
    tenants: TenantDirectory | None = getattr(request.app.state, "tenants", None)
    return tenants


async def require_admin(request: Request, settings: SettingsDep) -> Tenant:
    """Admin routes: the admin token (every name), or a tenant's key (the names it administers);
    off without either. Tokens are compared in constant time."""
    admin = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    tenants = _tenants(request)
    if not admin and tenants is None:
        raise AdminDisabled("admin routes are disabled; set ADAPTERSERVE_ADMIN_TOKEN to enable them")
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing bearer token", param="Authorization")
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        tenant = EVERYONE
    else:
        found = tenants.tenant_of(token) if tenants is not None else None
        if found is None or not found.administers:
            raise Forbidden("invalid admin token", param="Authorization")
        tenant = found
    request.state.tenant = tenant
    return tenant


AdminDep = Depends(require_admin)
AdminTenantDep = Annotated[Tenant, Depends(require_admin)]


def _admitted(request: Request, tenant: Tenant) -> Tenant:
    """The request's tenant, within its limits (429 beyond them; app/quotas.py)."""
    request.state.tenant = tenant
    quotas: TenantQuotas | None = getattr(request.app.state, "quotas", None)
    # (once per request: a route may name this dependency at the router and in its signature)
    if quotas is not None and tenant.limits != Limits() and getattr(request.state, "ticket", None) is None:
        request.state.ticket = quotas.admit(tenant)
    return tenant


async def require_api_key(request: Request, settings: SettingsDep) -> Tenant:
    """Inference and listing routes: with a tenants file, a tenant's key (or one of ``API_KEYS``: the
    tenant that may use everything); else open when no API keys are configured, or a listed bearer
    key (every key compared)."""
    tenants = _tenants(request)
    token = _bearer(request)
    keys = settings.api_key_list
    if tenants is not None:
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>", param="Authorization")
        tenant = tenants.tenant_of(token)
        if tenant is None and not any([hmac.compare_digest(token.encode(), k.encode()) for k in keys]):
            raise Unauthorized("invalid API key", param="Authorization")
        return _admitted(request, tenant or EVERYONE)
    if keys:
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>", param="Authorization")
        given = token.encode()
        if not any([hmac.compare_digest(given, key.encode()) for key in keys]):  # compare with every key
            raise Unauthorized("invalid API key", param="Authorization")
    request.state.tenant = EVERYONE
    return EVERYONE


ApiKeyDep = Depends(require_api_key)
TenantDep = Annotated[Tenant, Depends(require_api_key)]
