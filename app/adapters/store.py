"""The adapter store: the one source of truth for which adapters and versions exist, shared by every
replica (a folder, possibly on a shared volume, or an S3 bucket; see :mod:`app.adapters.objects`).

Layout (keys under the store's root)::

    _versions/<name>/0000000003.json   one manifest per version, created exclusively: the store
                                        allocates version numbers, never a replica's memory
    _blobs/<name>/<id>/<file>           the files of one uploaded version, written before its manifest
    _pins/<name>                        the adapter is pinned on every replica
    _compositions/<name>/0000000002.json  one record per version of a named composition (adapters
                                        combined; see :mod:`app.adapters.composition`), created exclusively
                                        like manifests; a deletion is a record too
    <name>/<file>                       an adapter placed by hand (a PEFT folder): version 1, or the
                                        version its ``adapterserve.json`` names

A version exists once its manifest exists: the manifest is written last and exclusively, so a
reader never sees half a version and two writers of one name get two distinct versions (the loser
of a race for number N retries with N + 1). The current version of a name is its highest manifest;
a deletion is a manifest too (a tombstone), so a re-upload continues the numbering. Files of
superseded versions and blobs no manifest names (an uploader killed half way) are reclaimed after a
grace period that outlasts any request still reading them.

Remote backends are read through a bounded local cache (LRU by bytes, every file checked against
the sha256 its manifest records), so the host tier always reads local files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.adapters.file_cache import FileCache, sha256_of
from app.adapters.objects import FilesystemObjects, MissingObject, Objects, fsync_dir, open_objects
from app.config import Settings
from app.errors import AdapterLoadFailed, InvalidRequest

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the whole name (fullmatch)
META_FILE = "adapterserve.json"  # summary of a hand-placed adapter, written on its first scan
VERSIONS = "_versions"
BLOBS = "_blobs"
PINS = "_pins"
COMPOSITIONS = "_compositions"
_MANIFEST_RE = re.compile(r"(\d{10})\.json")
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


@dataclass(frozen=True)
class Manifest:
    """One version of one adapter as the store records it."""

    name: str
    version: int
    created_at: float
    deleted: bool = False
    prefix: str = ""  # key prefix of the version's files ("_blobs/<name>/<id>/" or "<name>/")
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 ({} when placed by hand)
    meta: dict[str, Any] = field(default_factory=dict)  # summary: task, rank, ..., sha256, base_model

    @property
    def hand_placed(self) -> bool:
        return not self.prefix.startswith(BLOBS + "/")

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "created_at": self.created_at,
                "deleted": self.deleted,
                "prefix": self.prefix,
                "files": self.files,
                "meta": self.meta,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        return cls(
            name=str(raw["name"]),
            version=int(raw["version"]),
            created_at=float(raw["created_at"]),
            deleted=bool(raw.get("deleted", False)),
            prefix=str(raw.get("prefix", "")),
            files={str(k): str(v) for k, v in raw.get("files", {}).items()},
            meta=dict(raw.get("meta", {})),
        )


class AdapterStore:
    """Versioned adapters on an object backend; safe to share between processes and machines."""

    def __init__(self, objects: Objects, cache_dir: Path, cache_bytes: int = 2 << 30) -> None:
        self.objects = objects
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self._manifests: dict[tuple[str, int], Manifest] = {}  # immutable once written: cached
        self._placed: dict[str, Manifest] = {}  # hand-placed folders with a summary
        self._cache = FileCache(objects, cache_dir / "store", cache_bytes)
        self.pins: frozenset[str] = frozenset()  # names pinned fleet-wide, as of the last state()
        # named compositions' record versions, as of the last state()
        self.composition_versions: dict[str, list[int]] = {}
        self._records: dict[tuple[str, int], dict[str, Any]] = {}  # immutable once written: cached

    # --- reading ----------------------------------------------------------------------------
    def _manifest(self, name: str, version: int) -> Manifest:
        cached = self._manifests.get((name, version))
        if cached is None:
            cached = Manifest.from_json(self.objects.get(f"{VERSIONS}/{name}/{version:010d}.json"))
            self._manifests[(name, version)] = cached
        return cached

    def _listing(self, prefix: str = "") -> tuple[dict[str, list[int]], set[str]]:
        """Manifest version numbers per name, and the names with a hand-placed folder (a listing of
        the whole store also refreshes :attr:`pins`)."""
        versions: dict[str, list[int]] = {}
        placed: set[str] = set()
        pins: set[str] = set()
        compositions: dict[str, list[int]] = {}
        for key in self.objects.list(prefix):
            parts = key.split("/")
            if parts[0] == VERSIONS and len(parts) == 3 and NAME_RE.fullmatch(parts[1]):
                match = _MANIFEST_RE.fullmatch(parts[2])
                if match:
                    versions.setdefault(parts[1], []).append(int(match.group(1)))
            elif len(parts) == 2 and parts[1] == "adapter_config.json" and NAME_RE.fullmatch(parts[0]):
                placed.add(parts[0])
            elif parts[0] == PINS and len(parts) == 2 and NAME_RE.fullmatch(parts[1]):
                pins.add(parts[1])
            elif parts[0] == COMPOSITIONS and len(parts) == 3 and NAME_RE.fullmatch(parts[1]):
                match = _MANIFEST_RE.fullmatch(parts[2])
                if match:
                    compositions.setdefault(parts[1], []).append(int(match.group(1)))
        if not prefix:
            self.pins = frozenset(pins)
            self.composition_versions = compositions
        return versions, placed

    def _hand_placed(self, name: str) -> Manifest:
        """The manifest of a hand-placed folder: version 1, or what its ``adapterserve.json`` says."""
        cached = self._placed.get(name)
        if cached is not None:
            return cached
        try:
            meta = json.loads(self.objects.get(f"{name}/{META_FILE}"))
            meta = meta if isinstance(meta, dict) else {}
        except (MissingObject, ValueError):
            meta = {}
        manifest = Manifest(
            name=name,
            version=int(meta.get("version", 1)),
            created_at=float(meta.get("created_at", 0.0)),
            prefix=f"{name}/",
            meta=meta,
        )
        if meta:  # final once summarized; re-read until then
            self._placed[name] = manifest
        return manifest

    def _current(self, name: str, versions: list[int], placed: bool) -> Manifest:
        hand = self._hand_placed(name) if placed else None
        if versions and (hand is None or max(versions) >= hand.version):
            return self._manifest(name, max(versions))
        assert hand is not None
        return hand

    def state(self) -> dict[str, Manifest]:
        """The current manifest of every name the store knows (tombstones included): one listing of
        the store, manifests read once each."""
        versions, placed = self._listing()
        for gone in set(self._placed) - placed:
            del self._placed[gone]
        return {n: self._current(n, versions.get(n, []), n in placed) for n in {*versions, *placed}}

    def current(self, name: str) -> Manifest | None:
        """``name``'s current manifest read from the store now (None if it never existed)."""
        check_name(name)
        versions, _ = self._listing(f"{VERSIONS}/{name}/")
        _, placed = self._listing(f"{name}/")
        if not versions and not placed:
            return None
        return self._current(name, versions.get(name, []), name in placed)

    def folder(self, manifest: Manifest) -> Path:
        """A local folder holding the version's files (the files themselves on a filesystem store;
        checked copies in the local cache otherwise)."""
        local = self.objects.local_path(manifest.prefix.rstrip("/"))
        if local is not None:
            if not local.is_dir():
                raise AdapterLoadFailed(
                    f"adapter {manifest.name!r} version {manifest.version}: its files are gone from the "
                    "store",
                    param="adapter",
                )
            return local
        return self._cache.folder(manifest)

    # --- writing ----------------------------------------------------------------------------
    def staging_folder(self) -> Path:
        """A fresh local folder for an upload's files (inside the store on a filesystem: installing
        is then a rename)."""
        if isinstance(self.objects, FilesystemObjects):
            base = self.objects.root
        else:
            base = self.cache_dir / "staging"
            base.mkdir(parents=True, exist_ok=True)
        # named after its process: a restarted replica removes what its previous life left
        path = base / f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def install(self, name: str, staged: Path, meta: dict[str, Any]) -> Manifest:
        """Make the files of ``staged`` the next version of ``name``; return its manifest."""
        check_name(name)
        files = {f.name: sha256_of(f) for f in sorted(staged.iterdir()) if f.is_file()}
        blob = f"{BLOBS}/{name}/{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:12]}"
        if isinstance(self.objects, FilesystemObjects):
            target = self.objects.root.joinpath(*blob.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            for f in staged.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(staged, target)
            fsync_dir(target.parent)
        else:
            for file in files:
                self.objects.put(f"{blob}/{file}", staged / file)
        return self._commit(name, lambda v: Manifest(name, v, time.time(), False, f"{blob}/", files, meta))

    def delete(self, name: str) -> Manifest:
        """Record ``name`` as deleted (a tombstone version); its files are reclaimed later."""
        return self._commit(name, lambda v: Manifest(name, v, time.time(), deleted=True))

    def _commit(self, name: str, make: Any) -> Manifest:
        while True:
            current = self.current(name)
            manifest: Manifest = make(current.version + 1 if current else 1)
            if self.objects.create(f"{VERSIONS}/{name}/{manifest.version:010d}.json", manifest.to_json()):
                self._manifests[(name, manifest.version)] = manifest
                return manifest
            log.info("version %d of %s was taken by another writer; retrying", manifest.version, name)

    def set_pin(self, name: str, pinned: bool) -> None:
        """Record ``name`` as pinned on every replica (``_pins/<name>``), or not."""
        key = f"{PINS}/{check_name(name)}"
        if pinned:
            self.objects.put(key, json.dumps({"pinned_at": time.time()}).encode())
        else:
            self.objects.delete(key)

    # --- named compositions (records; their meaning is app.compositions') ----------------------
    def composition_record(self, name: str, version: int) -> dict[str, Any]:
        cached = self._records.get((name, version))
        if cached is None:
            raw = json.loads(self.objects.get(f"{COMPOSITIONS}/{name}/{version:010d}.json"))
            cached = self._records[(name, version)] = raw if isinstance(raw, dict) else {}
        return {**cached, "version": version}

    def composition(self, name: str) -> dict[str, Any] | None:
        """``name``'s current composition record read from the store now (None: never existed)."""
        check_name(name)
        versions = [
            int(m.group(1))
            for key in self.objects.list(f"{COMPOSITIONS}/{name}/")
            if (m := _MANIFEST_RE.fullmatch(key.rpartition("/")[2]))
        ]
        return self.composition_record(name, max(versions)) if versions else None

    def commit_composition(self, name: str, record: dict[str, Any]) -> int:
        """Record the next version of composition ``name`` (``{"deleted": true}`` deletes it)."""
        while True:
            current = self.composition(name)
            version = current["version"] + 1 if current else 1
            if self.objects.create(f"{COMPOSITIONS}/{name}/{version:010d}.json", json.dumps(record).encode()):
                self._records[(name, version)] = record
                return version
            log.info("version %d of composition %s was taken by another writer; retrying", version, name)

    def write_summary(self, manifest: Manifest, meta: dict[str, Any]) -> Manifest:
        """Record the summary of a hand-placed adapter beside its files (spares a re-validation)."""
        self.objects.put(f"{manifest.name}/{META_FILE}", json.dumps(meta).encode())
        self._placed.pop(manifest.name, None)
        return self._hand_placed(manifest.name)

    # --- reclaiming -------------------------------------------------------------------------
    def reclaim(self, grace_s: float) -> int:
        """Delete the files of versions superseded (or never committed) more than ``grace_s`` ago;
        return how many files went. Idempotent: any replica may run it at any time."""
        now = time.time()
        versions, placed = self._listing()
        live: set[str] = set()
        doomed: set[str] = set()
        for name in {*versions, *placed}:
            chain = [self._manifest(name, v) for v in sorted(versions.get(name, []))]
            if name in placed:
                chain = sorted([self._hand_placed(name), *chain], key=lambda m: m.version)
            for older, newer in zip(chain, [*chain[1:], None], strict=True):
                if not older.prefix:
                    continue
                superseded = newer is not None and now - newer.created_at > grace_s
                (doomed if superseded else live).add(older.prefix)
        removed = 0
        for key in self.objects.list():
            parts = key.split("/")
            if parts[0] == BLOBS and len(parts) >= 4:
                prefix = "/".join(parts[:3]) + "/"
                stamp = parts[2].split("-")[0]
                born = int(stamp) / 1000 if stamp.isdigit() else now
                orphan = prefix not in live and prefix not in doomed and now - born > grace_s
            elif len(parts) >= 2 and parts[0] != VERSIONS:
                prefix, orphan = parts[0] + "/", False
            else:
                continue
            if prefix in doomed or orphan:
                self.objects.delete(key)
                removed += 1
        if removed:
            self._placed = {n: m for n, m in self._placed.items() if m.prefix not in doomed}
            log.info("reclaimed %d files of superseded adapter versions", removed)
        return removed

    def recover(self) -> None:
        """Remove the staging folders of processes that died (another replica's may be an upload in
        progress); on a filesystem store, finish a replacement of the folder layout before versions
        (``.old-<name>``) that a crash interrupted."""
        local = isinstance(self.objects, FilesystemObjects)
        root = (
            self.objects.root if isinstance(self.objects, FilesystemObjects) else self.cache_dir / "staging"
        )
        if not root.is_dir():
            return
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX) and _abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
            elif local and path.name.startswith(_OLD_PREFIX):
                name = path.name[len(_OLD_PREFIX) :]
                if (root / name).is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, root / name)


def _abandoned(staging: Path) -> bool:
    """Whether a staging folder's process is gone: one of this host (this process's previous life
    included), or untouched for an hour (another host's, or named before names carried owners)."""
    parts = staging.name[len(_TMP_PREFIX) :].rsplit("-", 2)
    if len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
        pid = int(parts[1])
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return time.time() - staging.stat().st_mtime > 3600 or len(parts) != 3
    except FileNotFoundError:
        return False


def open_store(settings: Settings) -> AdapterStore:
    """The store ``ADAPTERSERVE_STORE`` names, its local cache under the cache folder."""
    return AdapterStore(
        open_objects(settings.store), settings.cache_dir / "adapter-store", settings.store_cache_bytes
    )


def folder_store(root: Path) -> AdapterStore:
    """A store in a local folder (tools and tests; the cache folder is never used for local files)."""
    return AdapterStore(FilesystemObjects(root), root / ".cache")
