"""Three tenants on one service through HTTP: each uses its own adapters on every route; a name
outside its scope answers exactly as a missing one (status and body, byte for byte, listings and
compositions included); admin changes outside its names are 403; the tenants file is re-read on
change without a restart; keys never reach the log or the metrics."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from app.models.base_lm import load_base_model
from app.tenants import RECHECK_S, key_hash
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, admin_headers, app_settings, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, zip_folder

KEYS = {"acme": "acme-key-7f3a", "beta": "beta-key-91c2", "ops": "ops-key-44d0"}
TENANTS = {
    "acme": {"keys": [key_hash(KEYS["acme"])], "adapters": ["acme-*"], "admin": ["acme-*"]},
    "beta": {"keys": [key_hash(KEYS["beta"])], "adapters": ["beta-*", "shared-*"]},
    "ops": {"keys": [key_hash(KEYS["ops"])], "adapters": ["*"], "admin": ["*"], "weight": 2},
}


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": TENANTS}))
    return path


@pytest.fixture(scope="module")
def app(
    base_path: Path,
    tenants_file: Path,
    ref_adapters: dict[str, RefAdapter],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    settings = app_settings(tmp_path_factory.mktemp("tenant-store"), tenants_file=tenants_file)
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    with TestClient(create_app(settings, base=base)) as client:
        for name, ref in (
            ("acme-topic", "cls-4"),
            ("acme-talk", "gen-qv-r8"),
            ("beta-talk", "gen-pattern"),
            ("shared-topic", "cls-4"),
        ):
            resp = upload_archive(client, name, zip_folder(ref_adapters[ref].folder))
            assert resp.status_code == 201, resp.text
        yield client


def _classify(client: TestClient, tenant: str, adapter: str) -> Any:
    return client.post(
        "/classify", json={"adapter": adapter, "inputs": CLASSIFY_TEXTS[:1]}, headers=_auth(tenant)
    )


def _chat(client: TestClient, tenant: str, model: str) -> Any:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    return client.post("/v1/chat/completions", json=body, headers=_auth(tenant))


def test_each_tenant_uses_its_adapters_and_outside_its_scope_is_a_missing_name(
    app: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    ref = ref_adapters["cls-4"]
    ok = _classify(app, "acme", "acme-topic")
    assert ok.status_code == 200
    assert abs(ok.json()["results"][0]["scores"][ref.labels[0]] - ref.probs[0][0]) <= 1e-4
    assert _classify(app, "beta", "shared-topic").status_code == 200
    assert _chat(app, "beta", "beta-talk").status_code == 200
    body = {"adapter": "acme-talk", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 10}
    gen = app.post("/generate", json=body, headers=_auth("acme"))
    assert gen.json()["text"] == ref_adapters["gen-qv-r8"].texts[GENERATE_PROMPTS[0]]
    # listings: each tenant sees what it may use
    listed = {
        t: {a["name"] for a in app.get("/v1/adapters", headers=_auth(t)).json()["adapters"]} for t in KEYS
    }
    assert listed == {
        "acme": {"acme-topic", "acme-talk"},
        "beta": {"beta-talk", "shared-topic"},
        "ops": {"acme-topic", "acme-talk", "beta-talk", "shared-topic"},
    }
    models = {m["id"] for m in app.get("/v1/models", headers=_auth("beta")).json()["data"]}
    assert models == {app.app.state.model_id, "beta-talk"}  # type: ignore[attr-defined]
    # a composition of ops' over acme's and beta's adapters: only ops may use it
    pair = {"name": "mixed", "members": ["acme-topic", "shared-topic"], "method": "mean"}
    assert app.post("/admin/compositions", json=pair, headers=_auth("ops")).status_code == 201
    assert _classify(app, "ops", "mixed").status_code == 200
    # outside the scope, each answer is byte for byte the one a missing name gets: seen before and
    # after the names are deleted
    probes: list[tuple[str, str, Any]] = [
        ("beta", "acme-topic", lambda t, n: _classify(app, t, n)),
        ("beta", "mixed", lambda t, n: _classify(app, t, n)),
        ("acme", "beta-talk", lambda t, n: _chat(app, t, n)),
        ("acme", "beta-talk", lambda t, n: app.get(f"/v1/adapters/{n}", headers=_auth(t))),
        ("acme", "mixed", lambda t, n: app.get(f"/v1/adapters/{n}", headers=_auth(t))),
        ("acme", "beta-talk", lambda t, n: app.get(f"/v1/models/{n}", headers=_auth(t))),
    ]
    # a composition beta may name whose member is acme's: the member answers as a missing adapter
    mix = {"name": "beta-mix", "members": ["beta-talk", "acme-talk"], "method": "average"}
    assert app.post("/admin/compositions", json=mix, headers=_auth("ops")).status_code == 201

    def generate(tenant: str, name: str) -> Any:
        body = {"adapter": name, "prompt": "Hi", "max_new_tokens": 2}
        return app.post("/generate", json=body, headers=_auth(tenant))

    via_mix, direct = generate("beta", "beta-mix"), generate("beta", "acme-talk")
    assert via_mix.status_code == 404 and via_mix.content == direct.content, via_mix.text
    assert "beta-mix" not in {
        c["name"] for c in app.get("/v1/adapters", headers=_auth("beta")).json()["compositions"]
    }
    assert generate("ops", "beta-mix").status_code == 200
    assert app.delete("/admin/compositions/beta-mix", headers=_auth("ops")).status_code == 204
    before = [(r.status_code, r.content) for r in (call(t, n) for t, n, call in probes)]
    assert {status for status, _ in before} == {404}
    assert b"acme-topic" not in before[0][1].replace(b"'acme-topic' not found", b"")  # no suggestion
    assert app.delete("/admin/compositions/mixed", headers=admin_headers()).status_code == 204
    assert app.delete("/admin/adapters/acme-topic", headers=admin_headers()).status_code == 204
    assert app.delete("/admin/adapters/beta-talk", headers=admin_headers()).status_code == 204
    after = [(r.status_code, r.content) for r in (call(t, n) for t, n, call in probes)]
    assert after == before
    for name, ref_name in (("acme-topic", "cls-4"), ("beta-talk", "gen-pattern")):
        assert upload_archive(app, name, zip_folder(ref_adapters[ref_name].folder)).status_code == 201


def test_admin_changes_outside_a_tenants_names_are_403(
    app: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    archive = zip_folder(ref_adapters["cls-4"].folder)

    def upload(tenant: str, name: str) -> Any:
        files = {"file": ("a.zip", archive, "application/zip")}
        return app.post("/admin/adapters", headers=_auth(tenant), data={"name": name}, files=files)

    assert upload("acme", "acme-new").status_code == 201
    denied = upload("acme", "beta-new")
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "forbidden", denied.text
    assert "beta-new" not in {
        a["name"] for a in app.get("/v1/adapters", headers=_auth("ops")).json()["adapters"]
    }
    assert upload("beta", "beta-new").status_code == 403  # beta administers nothing
    assert app.put("/admin/adapters/acme-new/pin", headers=_auth("acme")).json()["pinned"] is True
    assert app.delete("/admin/adapters/acme-new/pin", headers=_auth("acme")).status_code == 200
    assert app.put("/admin/adapters/shared-topic/pin", headers=_auth("acme")).status_code == 403
    assert app.delete("/admin/adapters/beta-talk", headers=_auth("acme")).status_code == 403
    comp = {"name": "acme-pair", "members": ["acme-topic", "shared-topic"], "method": "mean"}
    refused = app.post("/admin/compositions", json=comp, headers=_auth("acme"))
    assert refused.status_code == 404, refused.text  # shared-topic is not acme's to use
    assert app.delete("/admin/adapters/acme-new", headers=_auth("acme")).status_code == 204
    assert app.get("/v1/adapters", headers=_auth("acme")).status_code == 200
    # the admin token administers every name; a wrong or missing key is refused
    assert (
        app.get("/admin/compositions", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    )
    assert app.get("/v1/adapters", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert app.get("/v1/adapters").status_code == 401


def test_api_keys_still_act_for_the_tenant_that_uses_everything(
    base_path: Path, tenants_file: Path, tmp_path: Path
) -> None:
    settings = app_settings(tmp_path / "store", tenants_file=tenants_file, api_keys="legacy-key")
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    with TestClient(create_app(settings, base=base)) as client:
        legacy = client.get("/v1/models", headers={"Authorization": "Bearer legacy-key"})
        assert legacy.status_code == 200 and legacy.json()["data"][0]["id"] == client.app.state.model_id  # type: ignore[attr-defined]
        assert client.get("/v1/adapters", headers=_auth("beta")).status_code == 200
        assert client.get("/v1/adapters", headers={"Authorization": "Bearer other"}).status_code == 401


def test_the_file_is_reread_on_change_and_keys_stay_out_of_logs_and_metrics(
    app: TestClient, tenants_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    new_key = "gamma-key-0b17"
    assert app.get("/v1/adapters", headers={"Authorization": f"Bearer {new_key}"}).status_code == 401
    tenants = {**TENANTS, "gamma": {"keys": [key_hash(new_key)], "adapters": ["shared-*"]}}
    tenants_file.write_text(yaml.safe_dump({"tenants": tenants}))
    stat = tenants_file.stat()
    os.utime(tenants_file, (stat.st_atime, stat.st_mtime + 2))
    time.sleep(RECHECK_S + 0.1)
    listed = app.get("/v1/adapters", headers={"Authorization": f"Bearer {new_key}"})
    assert listed.status_code == 200, listed.text
    assert [a["name"] for a in listed.json()["adapters"]] == ["shared-topic"]
    # a file that does not parse keeps the tenants read before
    tenants_file.write_text("tenants: [this is not a mapping")
    os.utime(tenants_file, (stat.st_atime, stat.st_mtime + 4))
    time.sleep(RECHECK_S + 0.1)
    assert app.get("/v1/adapters", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    assert "not reloaded" in caplog.text
    metrics = app.get("/metrics").text
    for key in [*KEYS.values(), new_key]:
        assert key not in caplog.text and key not in metrics
    # the request log and the metrics carry the tenant's name
    access = [r for r in caplog.records if r.name == "adapterserve.access"]
    assert {getattr(r, "tenant", None) for r in access} >= {"gamma", None}  # None: not authenticated
    assert 'adapterserve_tenant_requests_total{status="200",tenant="gamma"} 2.0' in metrics
    assert 'adapterserve_tenant_requests_total{status="401",tenant=' not in metrics
    tenants_file.write_text(yaml.safe_dump({"tenants": TENANTS}))
    os.utime(tenants_file, (stat.st_atime, stat.st_mtime + 6))
