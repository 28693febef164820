"""Hand a trained adapter folder to a running server (admin upload) or straight to a store folder."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from app.adapters.archive import ALLOWED_FILES

if TYPE_CHECKING:  # (uploading to a server imports neither torch nor transformers: a CLI answers at once)
    from app.adapters.store import Manifest
    from app.config import Settings
    from app.models.base_lm import BaseSpec


class PublishError(RuntimeError):
    """The adapter could not be handed over; the message says why."""


def archive_bytes(folder: Path) -> bytes:
    """A .tar.gz of the files a server accepts (anything else in the folder stays out)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name in ALLOWED_FILES:
                tar.add(f, arcname=f.name)
    return buf.getvalue()


def upload(folder: Path, name: str, url: str, token: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """``POST <url>/admin/adapters``; return the server's description of the installed adapter."""
    endpoint = url.rstrip("/") + "/admin/adapters"
    try:
        resp = httpx.post(
            endpoint,
            headers={"Authorization": f"Bearer {token}"},
            data={"name": name},
            files={"file": (f"{name}.tar.gz", archive_bytes(folder), "application/gzip")},
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise PublishError(f"upload to {endpoint} failed: {exc}") from exc
    if resp.status_code != 201:
        raise PublishError(f"upload to {endpoint} answered {resp.status_code}: {resp.text}")
    result: dict[str, Any] = resp.json()
    return result


def install_into_store(folder: Path, name: str, settings: Settings, spec: BaseSpec) -> Manifest:
    """Validate the folder as the server would and install it as the next version of ``name`` in
    the store ``settings`` name; servers running on that store adopt it within their sync interval."""
    from app.adapters.store import open_store
    from app.adapters.summary import install_validated

    store = open_store(settings)
    staged = store.staging_folder()
    try:
        for f in folder.iterdir():
            if f.is_file() and f.name in ALLOWED_FILES:
                shutil.copyfile(f, staged / f.name)
        return install_validated(store, name, staged, spec, settings.max_lora_rank)[1]
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
