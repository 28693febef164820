"""Filesystem store: atomic installs, versions, crash recovery; archive planning."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from app.adapters.archive import ArchiveLimits, extract_archive
from app.adapters.store import FilesystemStore, check_name
from app.errors import AdapterNotFound, InvalidAdapter, InvalidRequest


def _stage(store: FilesystemStore, content: str) -> Path:
    staged = store.staging_folder()
    (staged / "adapter_config.json").write_text(content)
    return staged


def test_install_versions_and_delete(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    assert store.install("a", _stage(store, "v1"), {})["version"] == 1
    assert store.install("a", _stage(store, "v2"), {})["version"] == 2
    assert (tmp_path / "a" / "adapter_config.json").read_text() == "v2"
    assert store.names() == ["a"]
    store.delete("a")
    assert store.names() == []
    with pytest.raises(AdapterNotFound):
        store.folder("a")
    assert list(tmp_path.iterdir()) == []


def test_recover_cleans_temp_and_restores_interrupted_replace(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    store.install("a", _stage(store, "v1"), {})
    store.install("b", _stage(store, "b1"), {})
    _stage(store, "half-written")  # a crash mid-upload leaves a temporary folder
    (tmp_path / "a").rename(tmp_path / ".old-a")  # a crash between the two renames of a replace
    (tmp_path / ".old-b").mkdir()  # a crash after the new version landed, before cleanup
    FilesystemStore(tmp_path).recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a" / "adapter_config.json").read_text() == "v1"


@pytest.mark.parametrize("bad", ["", ".x", "../a", "a/b", "a b", "x" * 65, "-a", "a\n", "a\x00"])
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
