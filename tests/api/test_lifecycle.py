"""Upload formats, versions, delete, listing, health and metrics through the HTTP API."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.adapters.store import folder_store
from app.config import Settings
from app.main import create_app
from tests.conftest import admin_headers, snapshot
from tests.helpers.peft_ref import CLASSIFY_TEXTS, RefAdapter, tar_folder, zip_folder


def _post(client: TestClient, name: str, data: bytes, filename: str) -> dict:  # type: ignore[type-arg]
    resp = client.post(
        "/admin/adapters",
        headers=admin_headers(),
        data={"name": name},
        files={"file": (filename, data, "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_upload_tar_gz_with_top_folder_versions_and_delete(
    client: TestClient, uploaded: dict[str, RefAdapter], store_dir: Path
) -> None:
    ref = uploaded["cls-4"]
    first = _post(client, "cls-copy", tar_folder(ref.folder, prefix="my-adapter/"), "a.tar.gz")
    assert first["version"] == 1 and first["task"] == "classify" and first["rank"] == 8
    assert first["labels"] == ref.labels and len(first["sha256"]) == 64 and first["size_bytes"] > 0
    # a new version of the same name, from a zip with the same folder layout
    second = _post(client, "cls-copy", zip_folder(ref.folder, prefix="x/"), "a.zip")
    assert second["version"] == 2
    assert client.get("/v1/adapters/cls-copy").json()["version"] == 2
    resp = client.post("/classify", json={"adapter": "cls-copy", "inputs": CLASSIFY_TEXTS[:1]})
    scores = resp.json()["results"][0]["scores"]
    assert abs(scores[ref.labels[0]] - ref.probs[0][0]) <= 1e-4
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert {"cls-copy", *uploaded} <= set(listed)
    assert listed["cls-copy"]["request_count"] >= 1 and listed["cls-copy"]["last_used"] is not None
    assert listed["cls-copy"]["tier"] == "device"
    before = {k: v for k, v in snapshot(store_dir).items() if "/cls-copy/" not in f"/{k}"}
    resp = client.delete("/admin/adapters/cls-copy", headers=admin_headers())
    assert resp.status_code == 204
    assert client.get("/v1/adapters/cls-copy").status_code == 404
    assert client.post("/classify", json={"adapter": "cls-copy", "inputs": ["x"]}).status_code == 404
    deleted = folder_store(store_dir).current("cls-copy")  # a tombstone: the store's newest word
    assert deleted is not None and deleted.deleted
    # the other adapters' files are untouched
    assert {k: v for k, v in snapshot(store_dir).items() if "/cls-copy/" not in f"/{k}"} == before
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".")]


def test_config_without_task_type_is_inferred(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    """PEFT adapters made with a LoraConfig without task_type load; the task comes from the weights."""
    import io
    import json
    import zipfile

    for name, expected in (("gen-qv-r8", "generate"), ("cls-4", "classify")):
        folder = uploaded[name].folder
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["task_type"] = None
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in folder.iterdir():
                zf.writestr(f.name, json.dumps(cfg) if f.name == "adapter_config.json" else f.read_bytes())
        body = _post(client, f"{name}-notask", buf.getvalue(), "a.zip")
        assert body["task"] == expected
    resp = client.post("/classify", json={"adapter": "cls-4-notask", "inputs": CLASSIFY_TEXTS[:1]})
    assert abs(resp.json()["results"][0]["scores"]["business"] - uploaded["cls-4"].probs[0][0]) <= 1e-4
    for name in ("gen-qv-r8-notask", "cls-4-notask"):
        assert client.delete(f"/admin/adapters/{name}", headers=admin_headers()).status_code == 204


def test_store_survives_restart(
    base_path: Path, uploaded: dict[str, RefAdapter], store_dir: Path, client: TestClient
) -> None:
    """Adapters written by uploads are plain PEFT folders that a new catalog reads back."""
    from app.adapters.catalog import AdapterCatalog

    spec = client.app.state.catalog.intake.spec  # type: ignore[attr-defined]
    catalog = AdapterCatalog.detached(folder_store(store_dir), spec)
    catalog.scan()
    assert set(uploaded) <= {r.name for r in catalog.adapters()}
    assert list(catalog.get("cls-4").labels) == uploaded["cls-4"].labels


def test_health_ready_and_metrics(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client.post("/classify", json={"adapter": "cls-4", "inputs": ["hello"]})
    client.post("/classify", json={"adapter": "does-not-exist", "inputs": ["hello"]})
    text = client.get("/metrics").text
    assert 'adapterserve_requests_total{adapter="cls-4",endpoint="/classify",status="200"}' in text
    assert 'adapterserve_requests_total{adapter="unknown",endpoint="/classify",status="404"}' in text
    assert 'adapterserve_request_duration_seconds_count{endpoint="/classify"}' in text
    assert 'adapterserve_batch_size_count{task="classify"}' in text
    client.post("/generate", json={"adapter": "gen-qv-r8", "prompt": "Hello", "max_new_tokens": 3})
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("adapterserve_") and " " in line
    }
    assert values["adapterserve_time_to_first_token_seconds_count"] >= 1
    assert values["adapterserve_time_per_output_token_seconds_count"] >= 1
    assert values['adapterserve_generated_tokens_total{adapter="gen-qv-r8"}'] >= 3
    assert values['adapterserve_batch_size_count{task="generate"}'] >= 1
    assert "adapterserve_queue_depth" in values
    assert "adapterserve_generated_tokens_total" in text
    assert 'endpoint="/metrics"' not in text


def test_admin_routes_are_off_without_a_token(tmp_path: Path) -> None:
    app = create_app(Settings(store=tmp_path, admin_token=None))
    plain = TestClient(app)  # no lifespan: the admin check comes before anything else
    resp = plain.post(
        "/admin/adapters",
        headers={"Authorization": "Bearer x"},
        data={"name": "a"},
        files={"file": ("a.zip", b"PK", "application/zip")},
    )
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "admin_disabled"
    resp = plain.delete("/admin/adapters/a")
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "admin_disabled"
