"""GET /v1/adapters and GET /v1/adapters/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ApiKeyDep, RegistryDep, ServiceDep
from app.api.responses import READ, error_responses
from app.protocol.native import AdapterList, AdapterOut, CompositionOut

router = APIRouter(tags=["adapters"], dependencies=[ApiKeyDep], responses=error_responses(READ))


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(registry: RegistryDep, service: ServiceDep) -> AdapterList:
    """Every adapter in the store with its task, rank, version and residency; every named
    composition with its members and method."""
    compositions = service.compositions
    return AdapterList(
        adapters=[AdapterOut(**registry.describe(info)) for info in registry.list()],
        compositions=[CompositionOut(**compositions.describe(c)) for c in compositions.all()],
    )


@router.get("/v1/adapters/{name}", response_model=AdapterOut | CompositionOut)
async def get_adapter(name: str, registry: RegistryDep, service: ServiceDep) -> AdapterOut | CompositionOut:
    """One adapter's metadata, or a named composition's."""
    comp = await service.compositions.lookup(name)
    if comp is not None:
        return CompositionOut(**service.compositions.describe(comp))
    await registry.lookup(name)
    return AdapterOut(**registry.describe(registry.get(name)))
