"""Filesystem adapter store: one folder per adapter, atomic installs and crash recovery.

Layout: ``<root>/<name>/`` holds the adapter files (a PEFT folder) plus ``adapterserve.json``
(version and upload time). An install writes a hidden temporary folder, fsyncs it and renames
it into place; a replacement first renames the old folder to ``.old-<name>`` so that a crash at
any point leaves either the old or the new version visible, and :meth:`recover` finishes the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from app.errors import AdapterNotFound, InvalidRequest

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the whole name (fullmatch)
META_FILE = "adapterserve.json"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            "adapter name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with "
            "a letter or digit",
            param="name",
        )
    return name


class AdapterStore(ABC):
    """Where adapter folders live. The filesystem backend is the reference implementation."""

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def folder(self, name: str) -> Path: ...

    @abstractmethod
    def meta(self, name: str) -> dict[str, Any]: ...

    @abstractmethod
    def staging_folder(self) -> Path: ...

    @abstractmethod
    def install(self, name: str, staged: Path, summary: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def write_meta(self, name: str, meta: dict[str, Any]) -> None: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def recover(self) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore(AdapterStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and NAME_RE.fullmatch(p.name) and not p.name.startswith(".")
        )

    def folder(self, name: str) -> Path:
        path = self.root / check_name(name)
        if not path.is_dir():
            raise AdapterNotFound(f"adapter {name!r} not found", param="adapter")
        return path

    def meta(self, name: str) -> dict[str, Any]:
        path = self.folder(name) / META_FILE
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {"version": 1, "created_at": self.folder(name).stat().st_mtime}

    def staging_folder(self) -> Path:
        path = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def install(self, name: str, staged: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """Make ``staged`` the current version of ``name`` and return its metadata (under the name lock).

        ``summary`` (task, rank, sha256, ...) is stored beside the version so that a restart can list
        the store without reading every adapter's weights.
        """
        check_name(name)
        target = self.root / name
        version = int(self.meta(name).get("version", 1)) + 1 if target.is_dir() else 1
        meta = {**summary, "version": version, "created_at": time.time()}
        (staged / META_FILE).write_text(json.dumps(meta))
        for f in staged.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(staged)
        old = self.root / f"{_OLD_PREFIX}{name}"
        if target.is_dir():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(staged, target)
        _fsync_dir(self.root)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return meta

    def write_meta(self, name: str, meta: dict[str, Any]) -> None:
        """Replace the metadata file of ``name`` atomically."""
        folder = self.folder(name)
        tmp = folder / f"{_TMP_PREFIX}{META_FILE}"
        with tmp.open("w") as fh:
            json.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / META_FILE)

    def delete(self, name: str) -> None:
        target = self.folder(name)
        trash = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        os.replace(target, trash)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def recover(self) -> None:
        """Remove leftover temporary folders; restore an old version whose replacement never landed."""
        for path in self.root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(_OLD_PREFIX):
                name = path.name[len(_OLD_PREFIX) :]
                if (self.root / name).is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, self.root / name)
