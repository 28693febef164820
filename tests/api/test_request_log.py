"""Request ids and the structured request log: ids in and out, one JSON line per request with the
route template, never a token; metrics labelled by route template, not by raw path."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from app.logs import JsonFormatter
from tests.conftest import ADMIN_TOKEN, admin_headers
from tests.helpers.peft_ref import RefAdapter


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "adapterserve.access"]


def test_request_ids_and_the_request_log(
    client: TestClient, uploaded: dict[str, RefAdapter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adapterserve.access")
    resp = client.post(
        "/classify", json={"adapter": "cls-4", "inputs": "hi"}, headers={"X-Request-ID": "trace-42"}
    )
    assert resp.status_code == 200 and resp.headers["X-Request-ID"] == "trace-42"
    (record,) = _access(caplog)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "trace-42" and line["endpoint"] == "/classify" and line["status"] == 200
    assert line["adapter"] == "cls-4" and line["method"] == "POST" and line["latency_ms"] > 0
    assert line["level"] == "info" and line["logger"] == "adapterserve.access" and line["ts"].endswith("Z")

    caplog.clear()
    for bad in ("has space", "x" * 200, 'quote"d'):
        rid = client.get("/v1/adapters/cls-4", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert rid != bad and len(rid) == 32 and int(rid, 16) >= 0  # replaced by a fresh id
    assert [r.endpoint for r in _access(caplog)] == ["/v1/adapters/{name}"] * 3  # type: ignore[attr-defined]
    assert len({r.request_id for r in _access(caplog)}) == 3  # type: ignore[attr-defined]


def test_no_token_or_key_is_ever_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert client.delete("/admin/adapters/no-such", headers=admin_headers()).status_code == 404
    assert (
        client.delete("/admin/adapters/no-such", headers={"Authorization": "Bearer wrong-token"}).status_code
        == 403
    )
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "/admin/adapters/{name}" in text
    assert ADMIN_TOKEN not in text and "wrong-token" not in text and "Bearer" not in text


def test_metrics_label_routes_by_template(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    client.get("/v1/adapters/cls-4")
    client.get("/v1/adapters/gen-qv-r8")
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'endpoint="/v1/adapters/{name}"' in text and 'endpoint="/v1/adapters/cls-4"' not in text
    assert 'endpoint="unmatched"' in text and "/no/such/path" not in text


def test_a_refused_request_logs_its_error_and_what_it_asked_for(
    client: TestClient, uploaded: dict[str, RefAdapter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adapterserve.access")
    cases = [  # (method, path, body, status, error, adapter in the log line)
        ("POST", "/classify", {"adapter": "cls-4"}, 422, "invalid_request", "cls-4"),  # no inputs
        ("POST", "/classify", {"adapter": "no-such", "inputs": "hi"}, 404, "adapter_not_found", "no-such"),
        (
            "POST",
            "/v1/completions",
            {"model": "gen-qv-r8", "prompt": "x", "n": 0},
            400,
            "invalid_request",
            "gen-qv-r8",
        ),
        ("POST", "/classify", {"adapter": "cls-4", "inputs": "hi"}, 200, None, "cls-4"),
    ]
    for method, path, body, status, error, adapter in cases:
        caplog.clear()
        assert client.request(method, path, json=body).status_code == status
        (record,) = _access(caplog)
        line = json.loads(JsonFormatter().format(record))
        assert (line["status"], line["error"], line["adapter"]) == (status, error, adapter), line


def test_unknown_routes_answer_in_the_shape_of_their_api(client: TestClient) -> None:
    openai_404 = client.post("/v1/audio/speech", json={})
    assert openai_404.status_code == 404
    err = openai_404.json()["error"]
    assert err["code"] == "not_found" and err["type"] == "invalid_request_error"
    assert "POST /v1/audio/speech" in err["message"]
    native = client.get("/no/such/path").json()["error"]
    assert native["type"] == "not_found" and "GET /no/such/path" in native["message"]
