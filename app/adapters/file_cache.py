"""The local disk cache of a remote store's files: a version's files are downloaded once, checked
against the sha256 its manifest records, and kept within a byte budget (least recently used out
first), so that the host tier always reads local files."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from app.adapters.objects import MissingObject, Objects
from app.errors import AdapterLoadFailed

if TYPE_CHECKING:
    from app.adapters.store import Manifest

_TMP_PREFIX = ".tmp-"
META_FILE = "adapterserve.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileCache:
    """Checked local copies of remote versions under ``root``, at most ``max_bytes``."""

    def __init__(self, objects: Objects, root: Path, max_bytes: int) -> None:
        self.objects = objects
        self.root = root
        self.max_bytes = max_bytes

    def folder(self, manifest: Manifest) -> Path:
        """The version's files in the local cache, downloaded and checked on first use."""
        digest = hashlib.sha256(f"{self.objects.url}|{manifest.prefix}".encode()).hexdigest()[:24]
        folder = self.root / digest
        if folder.is_dir():
            os.utime(folder)  # recently used
            return folder
        files = manifest.files or {k.rsplit("/", 1)[-1]: "" for k in self.objects.list(manifest.prefix)}
        tmp = folder.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        try:
            for file, sha in files.items():
                if "/" in file or file == META_FILE:
                    continue
                self.objects.download(f"{manifest.prefix}{file}", tmp / file)
                if sha and sha256_of(tmp / file) != sha:
                    raise AdapterLoadFailed(
                        f"adapter {manifest.name!r} version {manifest.version}: {file} does not match "
                        "the sha256 its manifest records",
                        param="adapter",
                    )
            try:
                os.replace(tmp, folder)
            except OSError:  # another process sharing this cache got it first
                if not folder.is_dir():
                    raise
        except MissingObject as exc:
            raise AdapterLoadFailed(
                f"adapter {manifest.name!r} version {manifest.version}: its files are gone from the store",
                param="adapter",
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._trim(keep=folder)
        return folder

    def _trim(self, keep: Path) -> None:
        root = self.root
        entries = []
        for entry in root.iterdir():
            if entry.name.startswith(_TMP_PREFIX) or not entry.is_dir():
                continue
            size = sum(f.stat().st_size for f in entry.iterdir())
            entries.append((entry.stat().st_mtime, size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry != keep:
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
