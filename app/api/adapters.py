"""GET /v1/adapters and GET /v1/adapters/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ApiKeyDep, CatalogDep
from app.api.responses import READ, error_responses
from app.protocol.native import AdapterList, AdapterOut, CompositionOut

router = APIRouter(tags=["adapters"], dependencies=[ApiKeyDep], responses=error_responses(READ))


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(catalog: CatalogDep) -> AdapterList:
    """Every adapter in the store with its task, rank, version and residency; every named
    composition with its members and method."""
    return AdapterList(
        adapters=[AdapterOut(**catalog.describe(record)) for record in catalog.adapters()],
        compositions=[CompositionOut(**catalog.describe_composition(c)) for c in catalog.compositions()],
    )


@router.get("/v1/adapters/{name}", response_model=AdapterOut | CompositionOut)
async def get_adapter(name: str, catalog: CatalogDep) -> AdapterOut | CompositionOut:
    """One adapter's metadata, or a named composition's."""
    await catalog.lookup(name)
    comp = catalog.composition(name)
    if comp is not None:
        return CompositionOut(**catalog.describe_composition(comp))
    return AdapterOut(**catalog.describe(catalog.get(name)))
