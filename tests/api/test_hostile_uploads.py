"""Hostile uploads: every archive attack and every bad-weights case is refused (400/413/422) with a
message naming the problem, and the store, the served outputs and the temporary folder are
byte-for-byte unchanged afterwards."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tests.conftest import admin_headers, expect_error, snapshot, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, zip_files, zip_folder

BOMB_BYTES = 136 << 20  # beyond the uncompressed limit: twice MAX_UPLOAD_BYTES (64 MiB in these tests)


def _served(client: TestClient) -> dict[str, Any]:
    """What the service answers now: outputs of both adapters and each adapter's identity."""
    classify = client.post("/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})
    body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 8}
    client.post("/generate", json=body)  # (its prompt is now in the prefix cache: usage alike every time)
    generate = client.post("/generate", json=body)
    keys = ("name", "version", "sha256", "size_bytes", "task", "rank")
    adapters = [{k: a[k] for k in keys} for a in client.get("/v1/adapters").json()["adapters"]]
    return {"classify": classify.content, "generate": generate.content, "adapters": adapters}


def _spooled() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("adapterserve-upload-*")}


@pytest.fixture(scope="module")
def before(client: TestClient, uploaded: dict[str, RefAdapter], store_dir: Path) -> dict[str, Any]:
    return {"store": snapshot(store_dir), "served": _served(client), "spooled": _spooled()}


@pytest.fixture()
def unchanged(client: TestClient, store_dir: Path, before: dict[str, Any]) -> Any:
    """Each test: the store and the temporary folder are unchanged afterwards."""
    yield
    assert snapshot(store_dir) == before["store"]
    assert _spooled() <= before["spooled"]
    assert not (store_dir.parent / "evil.json").exists() and not (store_dir / "evil.json").exists()


# --- archives -------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _tar(files: dict[str, bytes], special: list[tarfile.TarInfo] | None = None, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special or []:
            tf.addfile(info)
    return buf.getvalue()


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _zip_special(files: dict[str, bytes], name: str, mode: int, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        info = zipfile.ZipInfo(name)
        info.external_attr = (mode | 0o777) << 16
        zf.writestr(info, data)
    return buf.getvalue()


def _zip_bomb(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _files(folder).items():
            zf.writestr(name, data)
        with zf.open("README.md", "w", force_zip64=True) as out:
            chunk = b"\0" * (1 << 20)
            for _ in range(BOMB_BYTES >> 20):
                out.write(chunk)
    return buf.getvalue()


def _tar_bomb(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for name, data in _files(folder).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("README.md")
        info.size = BOMB_BYTES
        tf.addfile(info, _Zeros(BOMB_BYTES))
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def _many_members(folder: Path) -> bytes:
    return zip_files({f"d{i}/README.md": b"x" for i in range(17)})


def _duplicate(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        for name, data in _files(folder).items():
            zf.writestr(name, data)
        zf.writestr("labels.json", b'["a"]')
    return buf.getvalue()


ARCHIVES: dict[str, tuple[Callable[[Path], bytes], int, str]] = {
    "not-an-archive": (lambda f: b"this is not an archive at all" * 10, 400, "zip"),
    "empty-file": (lambda f: b"", 400, "zip"),
    "truncated-zip": (lambda f: zip_folder(f)[:500], 400, "corrupt"),
    "gzip-not-tar": (lambda f: __import__("gzip").compress(b"hello" * 100), 400, "corrupt"),
    "empty-zip": (lambda f: zip_files({}), 400, "missing"),
    "pickle": (lambda f: zip_files({**_files(f), "adapter_model.bin": b"\x80\x04K\x01."}), 400, "pickle"),
    "pickle-pt": (lambda f: zip_files({**_files(f), "optimizer.pt": b"\x80\x04K\x01."}), 400, "pickle"),
    "path-traversal": (lambda f: zip_files({**_files(f), "../evil.json": b"{}"}), 400, ".."),
    "deep-traversal": (lambda f: zip_files({**_files(f), "a/../../evil.json": b"{}"}), 400, ".."),
    "absolute-path": (lambda f: zip_files({**_files(f), "/etc/evil.json": b"{}"}), 400, "absolute"),
    "windows-path": (lambda f: zip_files({**_files(f), "C:\\evil.json": b"{}"}), 400, "absolute"),
    "backslash-traversal": (lambda f: zip_files({**_files(f), "..\\evil.json": b"{}"}), 400, ".."),
    "unexpected-file": (lambda f: zip_files({**_files(f), "run.sh": b"echo hi"}), 400, "unexpected"),
    "nested-folder": (
        lambda f: zip_files({f"a/{i}/{n}": d for i, (n, d) in enumerate(_files(f).items())}),
        400,
        "nested",
    ),
    "duplicate-member": (_duplicate, 400, "twice"),
    "too-many-members": (_many_members, 400, "at most 16"),
    "zip-bomb": (_zip_bomb, 400, "uncompressed size"),
    "tar-bomb": (_tar_bomb, 400, "uncompressed size"),
    "zip-symlink": (
        lambda f: _zip_special(_files(f), "x.json", stat.S_IFLNK, b"/etc/passwd"),
        400,
        "regular",
    ),
    "zip-device": (lambda f: _zip_special(_files(f), "x.json", stat.S_IFCHR), 400, "regular"),
    "tar-symlink": (
        lambda f: _tar(_files(f), [_member("x.json", tarfile.SYMTYPE, "/etc/passwd")]),
        400,
        "link",
    ),
    "tar-hardlink": (
        lambda f: _tar(_files(f), [_member("x.json", tarfile.LNKTYPE, "/etc/passwd")]),
        400,
        "link",
    ),
    "tar-char-device": (lambda f: _tar(_files(f), [_member("x.json", tarfile.CHRTYPE)]), 400, "special"),
    "tar-block-device": (lambda f: _tar(_files(f), [_member("x.json", tarfile.BLKTYPE)]), 400, "special"),
    "tar-fifo": (lambda f: _tar(_files(f), [_member("x.json", tarfile.FIFOTYPE)]), 400, "special"),
    "tar-traversal": (lambda f: _tar({**_files(f), "x/../../evil.json": b"{}"}), 400, ".."),
    "tar-absolute": (lambda f: _tar({**_files(f), "/tmp/evil.json": b"{}"}), 400, "absolute"),
    "plain-tar-symlink": (
        lambda f: _tar(_files(f), [_member("x.json", tarfile.SYMTYPE, "../../x")], mode="w"),
        400,
        "link",
    ),
    "missing-weights": (
        lambda f: zip_files({"adapter_config.json": (f / "adapter_config.json").read_bytes()}),
        400,
        "missing",
    ),
    "missing-config": (
        lambda f: zip_files({"adapter_model.safetensors": (f / "adapter_model.safetensors").read_bytes()}),
        400,
        "missing",
    ),
    "bad-json": (lambda f: zip_files({**_files(f), "adapter_config.json": b"{not json"}), 400, "json"),
    "json-not-object": (lambda f: zip_files({**_files(f), "adapter_config.json": b"[1, 2]"}), 400, "object"),
    "garbage-safetensors": (
        lambda f: zip_files({**_files(f), "adapter_model.safetensors": b"\x00" * 64}),
        400,
        "safetensors",
    ),
    "lying-safetensors-header": (
        lambda f: zip_files(
            {**_files(f), "adapter_model.safetensors": (1 << 40).to_bytes(8, "little") + b"{}"}
        ),
        400,
        "safetensors",
    ),
    "labels-mismatch": (lambda f: zip_files({**_files(f), "labels.json": b'["a", "b"]'}), 400, "labels"),
    "labels-duplicate": (
        lambda f: zip_files({**_files(f), "labels.json": b'["a", "a", "b", "c"]'}),
        400,
        "duplicate",
    ),
}


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_archive_attacks_are_refused(
    client: TestClient, uploaded: dict[str, RefAdapter], unchanged: None, case: str
) -> None:
    build, status, message = ARCHIVES[case]
    data = build(uploaded["cls-4"].folder)
    for name in ("cls-4", f"new-{case}"):  # replacing an adapter, and adding a new one
        expect_error(upload_archive(client, name, data), status, "invalid_adapter", message)
    assert client.get(f"/v1/adapters/new-{case}").status_code == 404


def test_oversized_upload_is_413(client: TestClient, unchanged: None) -> None:
    big = b"\0" * (65 * 1024 * 1024)
    expect_error(upload_archive(client, "too-big", big), 413, "upload_too_large", "limit")


def test_admin_auth_and_malformed_forms(
    client: TestClient, uploaded: dict[str, RefAdapter], unchanged: None
) -> None:
    data = zip_folder(uploaded["cls-4"].folder)
    files = {"file": ("a.zip", data, "application/zip")}
    expect_error(client.post("/admin/adapters", data={"name": "cls-4"}, files=files), 401, "unauthorized")
    wrong = {"Authorization": "Bearer wrong"}
    expect_error(
        client.post("/admin/adapters", headers=wrong, data={"name": "x"}, files=files), 403, "forbidden"
    )
    expect_error(client.delete("/admin/adapters/cls-4", headers=wrong), 403, "forbidden")
    expect_error(client.put("/admin/adapters/cls-4/pin", headers=wrong), 403, "forbidden")
    h = admin_headers()
    expect_error(client.post("/admin/adapters", headers=h, files=files), 422, "invalid_request", "name")
    expect_error(
        client.post("/admin/adapters", headers=h, data={"name": "x"}), 422, "invalid_request", "file"
    )
    raw = client.post(
        "/admin/adapters", headers={**h, "content-type": "multipart/form-data"}, content=b"junk"
    )
    expect_error(raw, 422, "invalid_request", "multipart")
    for bad in ("../etc", "a/b", ".hidden", "x" * 65, "a b", "name\n", "ünïcode"):
        expect_error(upload_archive(client, bad, data), 422, "invalid_request", "name")


# --- weights --------------------------------------------------------------------------------------
def _tensors_bytes(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    change(tensors)
    buf = folder.parent / "tmp.safetensors"
    save_file(tensors, str(buf))
    return buf.read_bytes()


def _first(t: dict[str, torch.Tensor], part: str = "lora_A") -> str:
    return next(k for k in sorted(t) if part in k)


def _set(
    part: str, value: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        k = _first(t, part)
        t[k] = value(t[k].clone())

    return change


def _poke(v: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        x.view(-1)[-1] = v
        return x

    return f


def _rename(t: dict[str, torch.Tensor]) -> None:
    k = _first(t)
    t[k.replace("q_proj", "nonexistent_proj")] = t.pop(k)


def _drop_b(t: dict[str, torch.Tensor]) -> None:
    del t[_first(t, "lora_B")]


def _foreign_prefix(t: dict[str, torch.Tensor]) -> None:
    k = _first(t)
    t["model." + k] = t.pop(k)


BAD_WEIGHTS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "unknown-module": (_rename, "not a linear layer"),
    "foreign-prefix": (_foreign_prefix, "prefix"),
    "missing-lora-b": (_drop_b, "both lora_A and lora_B"),
    "wrong-shape": (_set("lora_A", lambda x: torch.randn(x.shape[0], x.shape[1] + 1)), "shape"),
    "wrong-ndim": (_set("lora_A", lambda x: x.reshape(-1)), "shape"),
    "nan": (_set("lora_B", _poke(float("nan"))), "nan"),
    "inf": (_set("lora_B", _poke(float("inf"))), "inf"),
    "int-dtype": (_set("lora_A", lambda x: x.to(torch.int32)), "dtype"),
    "bool-dtype": (_set("lora_A", lambda x: x > 0), "dtype"),
    "embedding-lora": (
        lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 49152)}),
        "embedding",
    ),
    "modules-to-save": (
        lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(576)}),
        "modules_to_save",
    ),
    "dora": (
        lambda t: t.update({_first(t).replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(576)}),
        "dora",
    ),
    "no-weights": (lambda t: t.clear() or t.update({"other": torch.zeros(1)}), "unexpected"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights_are_refused(
    client: TestClient, uploaded: dict[str, RefAdapter], unchanged: None, case: str
) -> None:
    change, message = BAD_WEIGHTS[case]
    folder = uploaded["gen-qv-r8"].folder
    files = {**_files(folder), "adapter_model.safetensors": _tensors_bytes(folder, change)}
    for name in ("gen-qv-r8", f"new-{case}"):
        expect_error(upload_archive(client, name, zip_files(files)), 400, "invalid_adapter", message)
    assert client.get(f"/v1/adapters/new-{case}").status_code == 404


def _with_config(folder: Path, **changes: Any) -> bytes:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


@pytest.mark.parametrize(
    ("case", "config", "param"),
    [
        ("dora", {"use_dora": True}, "use_dora"),
        ("bias", {"bias": "all"}, "bias"),
        ("peft-type", {"peft_type": "LOHA"}, "peft_type"),
        ("task", {"task_type": "TOKEN_CLS"}, "task_type"),
        ("bad-r", {"r": 0}, "r"),
        ("string-r", {"r": "8"}, "r"),
        ("negative-alpha", {"lora_alpha": -1}, "lora_alpha"),
        ("rank-mismatch", {"r": 4}, None),
        ("over-the-rank-limit", {"r": 1000, "rank_pattern": {}}, None),
        ("bad-pattern", {"rank_pattern": {"[": 4}}, "rank_pattern"),
    ],
)
def test_unsupported_configs_name_the_field(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    unchanged: None,
    case: str,
    config: dict[str, Any],
    param: str | None,
) -> None:
    folder = uploaded["gen-qv-r8"].folder
    files = {**_files(folder), "adapter_config.json": _with_config(folder, **config)}
    err = expect_error(upload_archive(client, "gen-qv-r8", zip_files(files)), 400, "invalid_adapter")
    if param:
        assert err["param"] == param and param in err["message"]


def test_over_the_rank_limit_is_refused(
    client: TestClient, uploaded: dict[str, RefAdapter], unchanged: None
) -> None:
    """A real rank-80 adapter (MAX_LORA_RANK is 64): refused with the limit in the message."""
    folder = uploaded["gen-qv-r8"].folder

    def grow(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            t[k] = torch.randn(80, t[k].shape[1]) if "lora_A" in k else torch.randn(t[k].shape[0], 80)

    files = {
        "adapter_config.json": _with_config(folder, r=80, lora_alpha=160),
        "adapter_model.safetensors": _tensors_bytes(folder, grow),
    }
    expect_error(upload_archive(client, "big-rank", zip_files(files)), 400, "invalid_adapter", "limit 64")


def test_served_outputs_are_byte_for_byte_unchanged(client: TestClient, before: dict[str, Any]) -> None:
    """After every attack above: the same answers, byte for byte, from the same adapter versions."""
    assert _served(client) == before["served"]
