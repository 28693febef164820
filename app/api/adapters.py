"""GET /v1/adapters and GET /v1/adapters/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ApiKeyDep, RegistryDep
from app.api.responses import READ, error_responses
from app.protocol.native import AdapterList, AdapterOut

router = APIRouter(tags=["adapters"], dependencies=[ApiKeyDep], responses=error_responses(READ))


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(registry: RegistryDep) -> AdapterList:
    """Every adapter in the store with its task, rank, version and residency."""
    return AdapterList(adapters=[AdapterOut(**registry.describe(info)) for info in registry.list()])


@router.get("/v1/adapters/{name}", response_model=AdapterOut)
async def get_adapter(name: str, registry: RegistryDep) -> AdapterOut:
    """One adapter's metadata."""
    await registry.lookup(name)
    return AdapterOut(**registry.describe(registry.get(name)))
