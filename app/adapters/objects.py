"""Object backends of the adapter store: a folder or an S3 bucket, behind one small interface.

Keys are ``/``-separated paths relative to the store's root (``<name>/versions/0000000002.json``).
Every backend gives the same guarantees, which are all the versioned store
(:mod:`app.adapters.store`) builds on:

- a written object appears whole or not at all (no reader sees half a file);
- :meth:`Objects.create` writes an object only if the key is absent, atomically: of two writers
  of one key exactly one succeeds (``O_EXCL``-style ``link`` on a filesystem, ``If-None-Match: *``
  on S3);
- listing returns the keys under a prefix, in any order.

S3 goes through `obstore` (Rust's ``object_store``): credentials, region and endpoint from the
standard ``AWS_*`` variables, conditional puts on AWS S3, MinIO, R2 and Ceph RGW. The measurement
behind the choice is in ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

_TMP_PREFIX = ".tmp-"


class MissingObject(KeyError):
    """The key has no object."""


class Objects(ABC):
    """A flat key space of immutable-once-written objects."""

    url: str

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (a folder-like prefix: ``name/`` or ``""``), recursively."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Copy the object to the local file ``dest`` (written whole: temporary name, then rename)."""

    @abstractmethod
    def put(self, key: str, data: bytes | Path) -> None:
        """Write (or overwrite) an object from bytes or a local file."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if ``key`` is absent; False if another writer has it."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error."""

    def local_path(self, key: str) -> Path | None:
        """The object's own file when the backend is a local filesystem (read in place), else None."""
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes | Path) -> None:
    """Write ``data`` (bytes or a file's contents) to ``path`` and flush it to disk."""
    with path.open("wb") as out:
        if isinstance(data, Path):
            with data.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            out.write(data)
        out.flush()
        os.fsync(out.fileno())


class FilesystemObjects(Objects):
    """Objects as files under a root folder (local disk or a shared RWX volume such as NFS)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad object key {key!r}")
        return self.root.joinpath(*parts)

    def list(self, prefix: str = "") -> Iterator[str]:
        top = self.root / prefix if prefix else self.root
        if not top.is_dir():
            return
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # temporary and hidden folders
            rel = Path(folder).relative_to(self.root).as_posix()
            for f in files:
                if not f.startswith("."):
                    yield f if rel == "." else f"{rel}/{f}"

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise MissingObject(key) from exc

    def download(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise MissingObject(key)
        tmp = dest.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def _temp(self, path: Path, data: bytes | Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        _write_synced(tmp, data)
        return tmp

    def put(self, key: str, data: bytes | Path) -> None:
        path = self._path(key)
        os.replace(self._temp(path, data), path)
        fsync_dir(path.parent)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._temp(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive, also on NFS
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # drop folders left empty, up to the root
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Objects(Objects):
    """Objects in an S3 bucket (or any S3-compatible server) under an optional prefix."""

    def __init__(self, url: str) -> None:
        from obstore.store import S3Store  # imported here: only S3 stores need it

        self.url = url
        # the AWS_* variables configure the client; a plain-HTTP endpoint (a MinIO on a private
        # network, a test server) needs no extra switch
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        self._store = S3Store.from_url(url, client_options={"allow_http": endpoint.startswith("http://")})

    def list(self, prefix: str = "") -> Iterator[str]:
        import obstore

        for batch in obstore.list(self._store, prefix=prefix or None):
            for meta in batch:
                yield str(meta["path"])

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self._store, key).bytes())
        except FileNotFoundError as exc:
            raise MissingObject(key) from exc

    def download(self, key: str, dest: Path) -> None:
        import obstore

        tmp = dest.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            result = obstore.get(self._store, key)
            with tmp.open("wb") as out:
                for chunk in result.stream(min_chunk_size=1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
        except FileNotFoundError as exc:
            raise MissingObject(key) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def put(self, key: str, data: bytes | Path) -> None:
        import obstore

        obstore.put(self._store, key, data)

    def create(self, key: str, data: bytes) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(self._store, key, data, mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self._store, key)


def open_objects(location: str | Path) -> Objects:
    """The backend for a store location: ``s3://bucket/prefix`` or a folder path."""
    text = str(location)
    if text.startswith("s3://"):
        return S3Objects(text)
    return FilesystemObjects(Path(text))
