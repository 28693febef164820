"""Request errors: status, error type and message (hostile uploads: test_hostile_uploads.py)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import admin_headers
from tests.conftest import expect_error as _expect
from tests.helpers.peft_ref import RefAdapter


def test_unknown_adapter_is_404(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    _expect(client.post("/classify", json={"adapter": "nope", "inputs": ["x"]}), 404, "adapter_not_found")
    _expect(client.post("/generate", json={"adapter": "nope", "prompt": "x"}), 404, "adapter_not_found")
    _expect(client.get("/v1/adapters/nope"), 404, "adapter_not_found")
    _expect(client.delete("/admin/adapters/nope", headers=admin_headers()), 404, "adapter_not_found")


def test_a_near_miss_gets_a_suggestion(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    err = _expect(
        client.post("/classify", json={"adapter": "cls-44", "inputs": ["x"]}), 404, "adapter_not_found"
    )
    assert "did you mean 'cls-4'" in err["message"]
    oa = client.post("/v1/completions", json={"model": "gen-qv-r9", "prompt": "x", "max_tokens": 1})
    assert oa.status_code == 404 and "did you mean 'gen-qv-r8'" in oa.json()["error"]["message"]


def test_json_sent_to_the_upload_route_is_told_about_multipart(client: TestClient) -> None:
    err = _expect(
        client.post("/admin/adapters", headers=admin_headers(), json={"name": "x"}), 422, "invalid_request"
    )
    assert "multipart/form-data" in err["message"] and "adapterserve upload" in err["message"]


def test_a_body_without_content_type_is_told_to_send_json(client: TestClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    resp = client.post("/classify", content=b'{"adapter": "cls-4", "inputs": "x"}', headers=form)
    err = _expect(resp, 422, "invalid_request", "add -H 'Content-Type: application/json'")
    assert "valid dictionary" not in err["message"]


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
        # JSON types as the schema states them (found by the fuzzing): no coercion
        ("/generate", {"prompt": "x", "seed": True}),
        ("/generate", {"prompt": "x", "max_new_tokens": "5"}),
        ("/generate", {"prompt": "x", "stream": "false"}),
        ("/classify", {"adapter": "cls-4", "inputs": "x", "top_k": 1.0}),
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
