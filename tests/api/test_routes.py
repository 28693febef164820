"""Every route of the OpenAPI schema, once, through HTTP into the engine of the tiny model, with its
values checked (PEFT's outputs for the inference routes); the schema's paths and the ones visited
here are the same set, so a new route without a test here fails."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import admin_headers, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, zip_folder

PROMPT = GENERATE_PROMPTS[0]


def _close(scores: dict[str, float], labels: list[str], probs: list[float]) -> bool:
    return all(abs(scores[lab] - p) <= 1e-4 for lab, p in zip(labels, probs, strict=True))


def test_every_route_answers_through_the_engine(
    client: TestClient, uploaded: dict[str, RefAdapter], base_id: str
) -> None:
    visited: set[tuple[str, str]] = set()

    def call(method: str, route: str, path: str | None = None, status: int = 200, **kw: Any) -> Any:
        visited.add((method, route))
        resp = client.request(method, path or route, **kw)
        assert resp.status_code == status, resp.text
        return resp.json() if resp.content and status != 204 else None

    cls, gen = uploaded["cls-4"], uploaded["gen-qv-r8"]
    admin = admin_headers()
    assert call("GET", "/healthz") == {"status": "ok"}
    ready = call("GET", "/readyz")
    assert ready["status"] == "ready" and ready["model"] == base_id
    # inference: PEFT's outputs
    out = call("POST", "/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})
    for result, probs in zip(out["results"], cls.probs, strict=True):
        assert _close(result["scores"], cls.labels, probs)
    body = {"adapter": "gen-qv-r8", "prompt": PROMPT, "max_new_tokens": GEN_TOKENS}
    assert call("POST", "/generate", json=body)["text"] == gen.texts[PROMPT]
    completion = {"model": "gen-qv-r8", "prompt": PROMPT, "max_tokens": GEN_TOKENS, "temperature": 0}
    assert call("POST", "/v1/completions", json=completion)["choices"][0]["text"] == gen.texts[PROMPT]
    # embeddings of the bare base: both routes, the same unit vectors
    native_vecs = call("POST", "/embed", json={"inputs": [PROMPT, "Hello"]})["embeddings"]
    oa_vecs = call("POST", "/v1/embeddings", json={"model": base_id, "input": [PROMPT, "Hello"]})["data"]
    for mine, theirs in zip(native_vecs, oa_vecs, strict=True):
        assert max(abs(a - b) for a, b in zip(mine, theirs["embedding"], strict=True)) < 1e-6
        assert abs(sum(a * a for a in mine) - 1.0) < 1e-5
    assert native_vecs[0] != native_vecs[1]
    messages = [{"role": "user", "content": "Hello"}]
    native = call(
        "POST", "/generate", json={"adapter": "gen-qv-r8", "messages": messages, "max_new_tokens": 8}
    )
    chat = {"model": "gen-qv-r8", "messages": messages, "max_tokens": 8, "temperature": 0}
    assert (
        call("POST", "/v1/chat/completions", json=chat)["choices"][0]["message"]["content"] == native["text"]
    )
    # listings
    models = {m["id"] for m in call("GET", "/v1/models")["data"]}
    assert {base_id, *(n for n, r in uploaded.items() if r.task == "generate")} <= models
    assert not models & {n for n, r in uploaded.items() if r.task == "classify"}
    assert call("GET", "/v1/models/{model}", "/v1/models/gen-qv-r8")["parent"] == base_id
    assert set(uploaded) <= {a["name"] for a in call("GET", "/v1/adapters")["adapters"]}
    assert call("GET", "/v1/adapters/{name}", "/v1/adapters/cls-4")["labels"] == cls.labels
    # admin: upload, pin, unpin, compose, list, get, delete
    visited.add(("POST", "/admin/adapters"))
    resp = upload_archive(client, "routes-copy", zip_folder(cls.folder))
    assert resp.status_code == 201 and resp.json()["labels"] == cls.labels, resp.text
    pin = "/admin/adapters/{name}/pin"
    assert call("PUT", pin, "/admin/adapters/routes-copy/pin", headers=admin)["tier"] == "device"
    assert call("DELETE", pin, "/admin/adapters/routes-copy/pin", headers=admin)["pinned"] is False
    comp = {"name": "routes-pair", "members": ["cls-4", "routes-copy"], "method": "mean"}
    assert call("POST", "/admin/compositions", status=201, json=comp, headers=admin)["task"] == "classify"
    assert "routes-pair" in {c["name"] for c in call("GET", "/admin/compositions", headers=admin)}
    one = call("GET", "/admin/compositions/{name}", "/admin/compositions/routes-pair", headers=admin)
    assert [m["name"] for m in one["members"]] == ["cls-4", "routes-copy"]
    both = call("POST", "/classify", json={"adapter": "routes-pair", "inputs": CLASSIFY_TEXTS[:1]})
    assert _close(both["results"][0]["scores"], cls.labels, cls.probs[0])  # two copies: the same mean
    call("DELETE", "/admin/compositions/{name}", "/admin/compositions/routes-pair", 204, headers=admin)
    call("DELETE", "/admin/adapters/{name}", "/admin/adapters/routes-copy", 204, headers=admin)
    assert call("GET", "/v1/adapters/{name}", "/v1/adapters/routes-copy", 404)["error"]["type"] == (
        "adapter_not_found"
    )
    metrics = client.get("/metrics").text
    visited.add(("GET", "/metrics"))
    assert 'adapterserve_requests_total{adapter="cls-4",endpoint="/classify",status="200"}' in metrics
    schema = client.app.openapi()  # type: ignore[attr-defined]
    routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert visited == routes, routes ^ visited
