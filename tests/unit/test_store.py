"""The versioned store on both backends (a folder and an S3 server over HTTP): versions allocated
by the store, exclusive commits, tombstones, hand-placed folders, reclaiming, the checked local
cache; archive planning."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.adapters.archive import ArchiveLimits, extract_archive
from app.adapters.objects import FilesystemObjects, Objects, S3Objects
from app.adapters.store import AdapterStore, check_name
from app.errors import AdapterLoadFailed, InvalidAdapter, InvalidRequest
from tests.helpers.s3 import aws_env, new_bucket


@pytest.fixture(params=["filesystem", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Objects]:
    if request.param == "filesystem":
        yield FilesystemObjects(tmp_path / "store")
        return
    env = request.getfixturevalue("s3_env")
    with aws_env(env):
        yield S3Objects(new_bucket(env))


def _store(objects: Objects, tmp_path: Path, cache_bytes: int = 1 << 30) -> AdapterStore:
    return AdapterStore(objects, tmp_path / "cache", cache_bytes)


def _stage(store: AdapterStore, content: str) -> Path:
    staged = store.staging_folder()
    (staged / "adapter_config.json").write_text(content)
    (staged / "adapter_model.safetensors").write_bytes(content.encode() * 100)
    return staged


def _config(store: AdapterStore, name: str) -> str:
    manifest = store.current(name)
    assert manifest is not None and not manifest.deleted
    return (store.folder(manifest) / "adapter_config.json").read_text()


def test_versions_tombstones_and_renumbering(objects: Objects, tmp_path: Path) -> None:
    store = _store(objects, tmp_path)
    assert store.current("a") is None and store.state() == {}
    assert store.install("a", _stage(store, "v1"), {"task": "classify"}).version == 1
    assert store.install("a", _stage(store, "v2"), {}).version == 2
    assert _config(store, "a") == "v2"
    other = _store(objects, tmp_path / "other")  # a second replica sees the same state
    assert {n: m.version for n, m in other.state().items()} == {"a": 2}
    assert store.delete("a").version == 3
    state = other.state()
    assert state["a"].deleted and state["a"].version == 3
    assert other.install("a", _stage(other, "v4"), {}).version == 4  # numbering continues
    assert _config(store, "a") == "v4"


def test_concurrent_writers_get_distinct_versions(objects: Objects, tmp_path: Path) -> None:
    stores = [_store(objects, tmp_path / str(i)) for i in range(2)]
    got: list[int] = []
    lock = threading.Lock()

    def writer(store: AdapterStore, tag: str) -> None:
        for i in range(6):
            version = store.install("x", _stage(store, f"{tag}{i}"), {}).version
            with lock:
                got.append(version)

    threads = [threading.Thread(target=writer, args=(s, t)) for s, t in zip(stores, "ab", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 13))  # no lost update: every acknowledged version exists
    current = stores[0].current("x")
    assert current is not None and current.version == 12
    assert stores[1].state()["x"].version == 12  # one current version both agree on


def test_a_version_without_its_manifest_is_invisible_and_reclaimed(objects: Objects, tmp_path: Path) -> None:
    store = _store(objects, tmp_path)
    store.install("a", _stage(store, "v1"), {})
    # an uploader killed after writing its files, before its manifest
    old = int((time.time() - 7200) * 1000)
    objects.put(f"_blobs/a/{old:013d}-deadbeef0000/adapter_config.json", b"half")
    assert {n: m.version for n, m in store.state().items()} == {"a": 1}
    assert _config(store, "a") == "v1"
    store.install("a", _stage(store, "v2"), {})
    assert store.reclaim(grace_s=3600) == 1  # the orphan; v1 was superseded just now: kept
    v1_files = [k for k in objects.list("_blobs/") if "deadbeef" not in k]
    assert len(v1_files) == 4
    assert store.reclaim(grace_s=0) == 2  # v1's two files: superseded longer than the grace
    assert _config(store, "a") == "v2"
    assert len(list(objects.list("_blobs/"))) == 2


def test_hand_placed_folders_are_version_one(objects: Objects, tmp_path: Path) -> None:
    objects.put("demo/adapter_config.json", b"by hand")
    objects.put("demo/adapter_model.safetensors", b"w" * 10)
    objects.put("notes/readme.txt", b"not an adapter")
    store = _store(objects, tmp_path)
    state = store.state()
    assert list(state) == ["demo"] and state["demo"].version == 1 and state["demo"].hand_placed
    assert _config(store, "demo") == "by hand"
    summarized = store.write_summary(state["demo"], {"version": 1, "task": "classify"})
    assert summarized.meta["task"] == "classify"
    assert store.install("demo", _stage(store, "uploaded"), {}).version == 2
    assert _config(store, "demo") == "uploaded"
    assert store.delete("demo").version == 3
    store.reclaim(grace_s=0)  # the hand-placed files go with the versions they were
    assert not [k for k in objects.list("demo/")]


def test_an_older_store_layout_keeps_its_versions(tmp_path: Path) -> None:
    """Folders the server wrote before versions had manifests: the version in their metadata."""
    root = tmp_path / "store"
    (root / "a").mkdir(parents=True)
    (root / "a" / "adapter_config.json").write_text("old")
    (root / "a" / "adapterserve.json").write_text(json.dumps({"version": 5, "created_at": 1.0}))
    (root / ".old-b").mkdir()  # a crash between the two renames of an old-style replace
    (root / ".old-b" / "adapter_config.json").write_text("b")
    store = _store(FilesystemObjects(root), tmp_path)
    store.recover()
    assert {n: m.version for n, m in store.state().items()} == {"a": 5, "b": 1}
    assert store.install("a", _stage(store, "new"), {}).version == 6


def test_remote_files_are_cached_checked_and_bounded(tmp_path: Path, s3_env: dict[str, str]) -> None:
    with aws_env(s3_env):
        objects = S3Objects(new_bucket(s3_env))
        store = _store(objects, tmp_path, cache_bytes=800)  # each version below: 505 bytes
        first = store.install("a", _stage(store, "a" * 5), {})
        second = store.install("b", _stage(store, "b" * 5), {})
        folder = store.folder(first)
        assert (folder / "adapter_config.json").read_text() == "a" * 5
        assert store.folder(first) == folder  # read once
        os.utime(folder, (1, 1))  # the least recently used
        store.folder(second)  # 1010 bytes: more than the cache may hold
        assert not folder.exists()
        # a file changed in the bucket behind the store's back is refused, not served
        objects.put(f"{first.prefix}adapter_model.safetensors", b"tampered")
        with pytest.raises(AdapterLoadFailed, match="sha256"):
            store.folder(first)


@pytest.mark.parametrize("bad", ["", ".x", "../a", "a/b", "a b", "x" * 65, "-a", "a\n", "a\x00", "_versions"])
def test_check_name_rejects(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        check_name(bad)


def test_extract_limits_members_and_size(tmp_path: Path) -> None:
    data = tmp_path / "a.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (10 << 20))  # compresses to a few KB
    data.write_bytes(buf.getvalue())
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match="uncompressed"):
        extract_archive(data, dest, ArchiveLimits(max_members=4, max_total_bytes=1 << 20))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(5):
            zf.writestr(f"f{i}/README.md", b"x")
    data.write_bytes(buf.getvalue())
    with pytest.raises(InvalidAdapter, match="files"):
        extract_archive(data, dest, ArchiveLimits(max_members=4, max_total_bytes=1 << 20))


def test_extract_strips_one_top_folder(tmp_path: Path) -> None:
    data = tmp_path / "a.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("my-adapter/adapter_config.json", b"{}")
        zf.writestr("my-adapter/README.md", b"hi")
        zf.writestr("__MACOSX/._junk", b"")
    data.write_bytes(buf.getvalue())
    dest = tmp_path / "out"
    dest.mkdir()
    extract_archive(data, dest, ArchiveLimits(max_members=4, max_total_bytes=1 << 20))
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "adapter_config.json"]
