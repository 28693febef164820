"""Every error case: status, error type, and the store unchanged afterwards."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tests.conftest import admin_headers, snapshot
from tests.helpers.peft_ref import RefAdapter, zip_files, zip_folder


def _upload(client: TestClient, name: str, data: bytes, filename: str = "a.zip", headers: Any = None) -> Any:
    return client.post(
        "/admin/adapters",
        headers=admin_headers() if headers is None else headers,
        data={"name": name},
        files={"file": (filename, data, "application/octet-stream")},
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _tensors_bytes(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    change(tensors)
    tmp = folder.parent / "tmp.safetensors"
    save_file(tensors, str(tmp))
    return tmp.read_bytes()


def _with_config(folder: Path, **changes: Any) -> bytes:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


def _expect(resp: Any, status: int, type_: str, contains: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_, err
    assert contains.lower() in err["message"].lower(), err
    return err  # type: ignore[no-any-return]


def _first_key(t: dict[str, torch.Tensor], part: str = "lora_A") -> str:
    return next(k for k in t if part in k)


def _rename_key(t: dict[str, torch.Tensor]) -> None:
    k = _first_key(t)
    t[k.replace("q_proj", "nonexistent_proj")] = t.pop(k)


def _bad_shape(t: dict[str, torch.Tensor]) -> None:
    k = _first_key(t)
    t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 1)


def _nan(t: dict[str, torch.Tensor]) -> None:
    k = _first_key(t, "lora_B")
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    k = _first_key(t, "lora_B")
    t[k] = t[k].clone()
    t[k][-1, -1] = float("inf")


def _int_dtype(t: dict[str, torch.Tensor]) -> None:
    k = _first_key(t)
    t[k] = t[k].to(torch.int32)


def _full_module(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.norm.weight"] = torch.ones(576)


def _embedding(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 49152)


BAD_WEIGHTS = {
    "unknown-module": (_rename_key, "not a linear layer"),
    "wrong-shape": (_bad_shape, "shape"),
    "nan": (_nan, "nan"),
    "inf": (_inf, "inf"),
    "int-dtype": (_int_dtype, "dtype"),
    "embedding-lora": (_embedding, "embedding"),
    "modules-to-save": (_full_module, "modules_to_save"),
}


@pytest.fixture()
def store_before(store_dir: Path, uploaded: dict[str, RefAdapter]) -> dict[str, str]:
    return snapshot(store_dir)


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights_are_rejected_and_store_unchanged(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    store_dir: Path,
    store_before: dict[str, str],
    case: str,
) -> None:
    change, message = BAD_WEIGHTS[case]
    folder = uploaded["gen-qv-r8"].folder
    files = {**_files(folder), "adapter_model.safetensors": _tensors_bytes(folder, change)}
    _expect(_upload(client, "gen-qv-r8", zip_files(files)), 400, "invalid_adapter", message)
    _expect(_upload(client, f"new-{case}", zip_files(files)), 400, "invalid_adapter", message)
    assert snapshot(store_dir) == store_before
    assert client.get(f"/v1/adapters/new-{case}").status_code == 404


@pytest.mark.parametrize(
    ("case", "config", "param"),
    [
        ("dora", {"use_dora": True}, "use_dora"),
        ("bias", {"bias": "all"}, "bias"),
        ("peft-type", {"peft_type": "IA3"}, "peft_type"),
        ("task", {"task_type": "TOKEN_CLS"}, "task_type"),
        ("bad-r", {"r": 0}, "r"),
        ("rank-mismatch", {"r": 4}, None),
        ("too-high-rank", {"r": 1000, "rank_pattern": {}}, None),
    ],
)
def test_unsupported_configs_name_the_field(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    store_dir: Path,
    store_before: dict[str, str],
    case: str,
    config: dict[str, Any],
    param: str | None,
) -> None:
    folder = uploaded["gen-qv-r8"].folder
    files = {**_files(folder), "adapter_config.json": _with_config(folder, **config)}
    err = _expect(_upload(client, "gen-qv-r8", zip_files(files)), 400, "invalid_adapter")
    if param:
        assert err["param"] == param and param in err["message"]
    assert snapshot(store_dir) == store_before


ARCHIVES: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "not-an-archive": (lambda f: b"this is not an archive at all" * 10, "zip"),
    "truncated-zip": (lambda f: zip_folder(f)[:500], "corrupt"),
    "pickle": (lambda f: zip_files({**_files(f), "adapter_model.bin": b"\x80\x04K\x01."}), "pickle"),
    "path-traversal": (lambda f: zip_files({**_files(f), "../evil.json": b"{}"}), ".."),
    "absolute-path": (lambda f: zip_files({**_files(f), "/etc/evil.json": b"{}"}), "absolute"),
    "unexpected-file": (lambda f: zip_files({**_files(f), "run.sh": b"echo hi"}), "unexpected"),
    "missing-weights": (
        lambda f: zip_files({"adapter_config.json": (f / "adapter_config.json").read_bytes()}),
        "missing",
    ),
    "missing-config": (
        lambda f: zip_files({"adapter_model.safetensors": (f / "adapter_model.safetensors").read_bytes()}),
        "missing",
    ),
    "bad-json": (lambda f: zip_files({**_files(f), "adapter_config.json": b"{not json"}), "json"),
    "garbage-safetensors": (
        lambda f: zip_files({**_files(f), "adapter_model.safetensors": b"\x00" * 64}),
        "safetensors",
    ),
    "tar-symlink": (lambda f: _tar_with_symlink(f), "link"),
    "tar-traversal": (lambda f: _tar({**_files(f), "x/../../evil.json": b"{}"}), ".."),
}


def _tar(files: dict[str, bytes], symlink: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink is not None:
            link = tarfile.TarInfo(symlink[0])
            link.type = tarfile.SYMTYPE
            link.linkname = symlink[1]
            tf.addfile(link)
    return buf.getvalue()


def _tar_with_symlink(folder: Path) -> bytes:
    return _tar(_files(folder), symlink=("labels.json", "/etc/passwd"))


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_bad_archives_are_rejected_and_store_unchanged(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    store_dir: Path,
    store_before: dict[str, str],
    case: str,
) -> None:
    build, message = ARCHIVES[case]
    data = build(uploaded["cls-4"].folder)
    _expect(_upload(client, "cls-4", data), 400, "invalid_adapter", message)
    assert snapshot(store_dir) == store_before
    assert not (store_dir.parent / "evil.json").exists() and not (store_dir / "evil.json").exists()


def test_labels_must_match_the_head(
    client: TestClient, uploaded: dict[str, RefAdapter], store_dir: Path, store_before: dict[str, str]
) -> None:
    folder = uploaded["cls-4"].folder
    files = {**_files(folder), "labels.json": json.dumps(["a", "b"]).encode()}
    _expect(_upload(client, "cls-4", zip_files(files)), 400, "invalid_adapter", "labels")
    assert snapshot(store_dir) == store_before


def test_oversized_upload_is_413(client: TestClient, store_dir: Path, store_before: dict[str, str]) -> None:
    big = b"\0" * (65 * 1024 * 1024)
    _expect(_upload(client, "too-big", big), 413, "upload_too_large")
    assert snapshot(store_dir) == store_before


def test_admin_auth(
    client: TestClient, uploaded: dict[str, RefAdapter], store_dir: Path, store_before: dict[str, str]
) -> None:
    data = zip_folder(uploaded["cls-4"].folder)
    _expect(_upload(client, "cls-4", data, headers={}), 401, "unauthorized")
    _expect(_upload(client, "cls-4", data, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    _expect(
        client.delete("/admin/adapters/cls-4", headers={"Authorization": "Bearer wrong"}), 403, "forbidden"
    )
    assert snapshot(store_dir) == store_before


def test_invalid_adapter_name_is_422(
    client: TestClient, uploaded: dict[str, RefAdapter], store_dir: Path, store_before: dict[str, str]
) -> None:
    data = zip_folder(uploaded["cls-4"].folder)
    for bad in ("../etc", "a/b", ".hidden", "x" * 65):
        _expect(_upload(client, bad, data), 422, "invalid_request")
    assert snapshot(store_dir) == store_before


def test_unknown_adapter_is_404(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    _expect(client.post("/classify", json={"adapter": "nope", "inputs": ["x"]}), 404, "adapter_not_found")
    _expect(client.post("/generate", json={"adapter": "nope", "prompt": "x"}), 404, "adapter_not_found")
    _expect(client.get("/v1/adapters/nope"), 404, "adapter_not_found")
    _expect(client.delete("/admin/adapters/nope", headers=admin_headers()), 404, "adapter_not_found")


def test_task_mismatch_is_409(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    err = _expect(
        client.post("/classify", json={"adapter": "gen-qv-r8", "inputs": ["x"]}),
        409,
        "adapter_task_mismatch",
        "/generate",
    )
    assert err["param"] == "adapter"
    _expect(
        client.post("/generate", json={"adapter": "cls-4", "prompt": "x"}),
        409,
        "adapter_task_mismatch",
        "/classify",
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/classify", {"inputs": ["x"]}),
        ("/classify", {"adapter": "cls-4", "inputs": []}),
        ("/classify", {"adapter": "cls-4", "inputs": [""]}),
        ("/classify", {"adapter": "cls-4", "inputs": "x", "top_k": 0}),
        ("/classify", {"adapter": "cls-4", "inputs": "x", "unknown": 1}),
        ("/generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}),
        ("/generate", {}),
        ("/generate", {"prompt": "x", "temperature": -1}),
        ("/generate", {"prompt": "x", "top_p": 0}),
        ("/generate", {"prompt": "x", "max_new_tokens": 0}),
        ("/generate", {"prompt": "x", "max_new_tokens": 100000}),
        ("/generate", {"messages": [{"role": "robot", "content": "y"}]}),
    ],
)
def test_invalid_bodies_are_422(
    client: TestClient, uploaded: dict[str, RefAdapter], path: str, body: dict[str, Any]
) -> None:
    _expect(client.post(path, json=body), 422, "invalid_request")


def test_too_many_inputs_and_too_long_input_are_422(
    client: TestClient, uploaded: dict[str, RefAdapter]
) -> None:
    _expect(
        client.post("/classify", json={"adapter": "cls-4", "inputs": ["x"] * 65}),
        422,
        "invalid_request",
        "inputs",
    )
    _expect(client.post("/generate", json={"prompt": "word " * 3000}), 422, "invalid_request", "tokens")


def test_malformed_json_and_unknown_routes(client: TestClient) -> None:
    resp = client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    err = _expect(resp, 422, "invalid_request", "not valid JSON")
    assert err["param"] is None
    _expect(client.get("/no-such-route"), 404, "not_found")
    _expect(client.get("/classify"), 405, "method_not_allowed")
