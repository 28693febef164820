"""GET /v1/adapters and GET /v1/adapters/{name}: what the request's tenant may use."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ApiKeyDep, CatalogDep, TenantDep
from app.api.responses import READ, error_responses
from app.protocol.native import AdapterList, AdapterOut, CompositionOut

router = APIRouter(tags=["adapters"], dependencies=[ApiKeyDep], responses=error_responses(READ))


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(catalog: CatalogDep, tenant: TenantDep) -> AdapterList:
    """Every adapter in the store with its task, rank, version and residency; every named
    composition with its members and method (those the tenant may use)."""
    return AdapterList(
        adapters=[AdapterOut(**catalog.describe(r)) for r in catalog.adapters() if tenant.may_use(r.name)],
        compositions=[
            CompositionOut(**catalog.describe_composition(c))
            for c in catalog.compositions()
            if all(tenant.may_use(n) for n in [c.label, *c.names])
        ],
    )


@router.get("/v1/adapters/{name}", response_model=AdapterOut | CompositionOut)
async def get_adapter(name: str, catalog: CatalogDep, tenant: TenantDep) -> AdapterOut | CompositionOut:
    """One adapter's metadata, or a named composition's."""
    await catalog.lookup(name)
    comp = catalog.composition(name)
    if comp is not None and all(tenant.may_use(n) for n in [comp.label, *comp.names]):
        return CompositionOut(**catalog.describe_composition(comp))
    # (a composition the tenant may not use is not an adapter either: the same 404 as a missing name)
    return AdapterOut(**catalog.describe(catalog.get(name, tenant.may_use)))
