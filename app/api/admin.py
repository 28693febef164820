"""Admin routes: adapters (upload, pin, delete) and named compositions (create, list, delete)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile

from app.adapters.composition import Composition
from app.api.deps import AdminDep, AdminTenantDep, CatalogDep, SettingsDep
from app.api.responses import ADMIN, error_responses
from app.errors import AdapterNotFound, Forbidden, InvalidRequest, UploadTooLarge
from app.protocol.native import AdapterOut, CompositionIn, CompositionOut, member_list
from app.tenants import Tenant

router = APIRouter(tags=["admin"], dependencies=[AdminDep], responses=error_responses(ADMIN))

_MULTIPART_OVERHEAD = 64 * 1024
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "name": {"type": "string", "description": "adapter name"},
                        "file": {"type": "string", "format": "binary", "description": ".zip or .tar.gz"},
                    },
                }
            }
        },
    }
}


def _administers(tenant: Tenant, name: str) -> None:
    """403 when ``name`` is outside the names ``tenant`` administers (the admin token: all of them)."""
    if not tenant.may_administer(name):
        raise Forbidden(f"tenant {tenant.name!r} may not administer {name!r}", param="name")


def _spool(upload: UploadFile, limit: int, folder: Path) -> Path:
    """Copy the uploaded file into ``folder``, enforcing the size limit."""
    path = folder / "upload"
    size = 0
    with path.open("wb") as out:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise UploadTooLarge(f"upload exceeds the limit of {limit} bytes", param="file")
            out.write(chunk)
    return path


@router.post("/admin/adapters", status_code=201, response_model=AdapterOut, openapi_extra=_UPLOAD_SCHEMA)
async def upload_adapter(
    request: Request, catalog: CatalogDep, settings: SettingsDep, tenant: AdminTenantDep
) -> AdapterOut:
    """Upload an adapter archive; an existing name gets a new version."""
    limit = settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + _MULTIPART_OVERHEAD:
        raise UploadTooLarge(f"upload of {length} bytes exceeds the limit of {limit} bytes", param="file")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            f"this route takes a multipart/form-data body with fields 'name' and 'file' (a .zip or "
            f".tar.gz of the adapter folder), not {content_type or 'a body without Content-Type'}; "
            "e.g. curl -F name=my-adapter -F file=@my-adapter.tar.gz, or adapterserve upload FOLDER --name N",
            param="file",
        )
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as exc:  # malformed multipart bodies
        raise InvalidRequest(f"expected a multipart/form-data body with name and file: {exc}") from exc
    name, upload = form.get("name"), form.get("file")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("form field 'name' is required", param="name")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("form field 'file' (a .zip or .tar.gz archive) is required", param="file")
    request.state.adapter = name
    _administers(tenant, name)
    # the archive is spooled into a staging folder of the store: removed when the request ends
    # (also when the client goes away), and by the store's recovery after a crash
    staging = catalog.store.staging_folder()
    try:
        archive = await asyncio.to_thread(_spool, upload, limit, staging)
        record = await asyncio.to_thread(catalog.upload, name, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        await form.close()
    return AdapterOut(**catalog.describe(record))


@router.put("/admin/adapters/{name}/pin", response_model=AdapterOut)
async def pin_adapter(name: str, catalog: CatalogDep, tenant: AdminTenantDep) -> AdapterOut:
    """Pin an adapter on every replica (recorded in the store; the others follow within their sync
    interval): loaded into a device slot now and never evicted from host or device memory. Here it
    fails with nothing changed: 409 when too many are pinned or its stored files cannot be loaded,
    503 (Retry-After) when every device slot is in use by running requests or pinned."""
    _administers(tenant, name)
    return AdapterOut(**catalog.describe(await catalog.pin(name, fleet=True)))


@router.delete("/admin/adapters/{name}/pin", response_model=AdapterOut)
async def unpin_adapter(name: str, catalog: CatalogDep, tenant: AdminTenantDep) -> AdapterOut:
    """Unpin an adapter on every replica: it stays resident until least recently used."""
    _administers(tenant, name)
    return AdapterOut(**catalog.describe(await catalog.unpin(name, fleet=True)))


@router.delete("/admin/adapters/{name}", status_code=204)
async def delete_adapter(name: str, catalog: CatalogDep, tenant: AdminTenantDep) -> Response:
    """Delete an adapter; requests already running on it finish."""
    _administers(tenant, name)
    await catalog.delete(name)
    return Response(status_code=204)


@router.post("/admin/compositions", status_code=201, response_model=CompositionOut)
async def create_composition(
    body: CompositionIn, catalog: CatalogDep, tenant: AdminTenantDep
) -> CompositionOut:
    """Name a composition of adapters (an existing name gets a new version); it is checked as a
    request using it would be (members, task, labels; a merge is computed now) and recorded in the
    store, so every replica serves it."""
    _administers(tenant, body.name)
    members = tuple((m.name, m.weight) for m in member_list(body.members, None))
    for member, _ in members:  # its members: adapters it may use (others answer as missing ones do)
        if not tenant.may_use(member):
            catalog.get(member, tenant.may_use)
    comp = Composition(members, body.method, body.density, name=body.name)
    return CompositionOut(**catalog.describe_composition(await catalog.compose(comp)))


@router.get("/admin/compositions", response_model=list[CompositionOut])
async def list_compositions(catalog: CatalogDep, tenant: AdminTenantDep) -> list[CompositionOut]:
    """Every named composition (those the tenant administers)."""
    return [
        CompositionOut(**catalog.describe_composition(c))
        for c in catalog.compositions()
        if tenant.may_administer(c.label)
    ]


@router.get("/admin/compositions/{name}", response_model=CompositionOut)
async def get_composition(name: str, catalog: CatalogDep, tenant: AdminTenantDep) -> CompositionOut:
    """One named composition."""
    await catalog.lookup(name)
    comp = catalog.composition(name)
    if comp is None or not tenant.may_administer(name):
        raise AdapterNotFound(f"composition {name!r} not found", param="name")
    return CompositionOut(**catalog.describe_composition(comp))


@router.delete("/admin/compositions/{name}", status_code=204)
async def delete_composition(name: str, catalog: CatalogDep, tenant: AdminTenantDep) -> Response:
    """Delete a named composition; its members stay."""
    _administers(tenant, name)
    await catalog.delete_composition(name)
    return Response(status_code=204)
