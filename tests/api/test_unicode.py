"""Text that is valid JSON but not valid Unicode (a lone UTF-16 surrogate, ``"\\ud800"``) is refused
with a clear 4xx on every route and every text field, before it reaches a tokenizer, a template or a
grammar; the service goes on serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import admin_headers
from tests.helpers.peft_ref import RefAdapter

SURROGATE = "a\ud800b"


def _bodies(model: str) -> list[tuple[str, dict[str, Any]]]:
    """One valid body per JSON route, with every kind of text field the route takes."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}}
    tool = {
        "type": "function",
        "function": {"name": "lookup", "description": "find", "parameters": {"type": "object"}},
    }
    return [
        ("/classify", {"adapter": "cls-4", "inputs": ["first text", "second text"]}),
        (
            "/generate",
            {
                "adapters": ["gen-qv-r8", {"name": "gen-pattern", "weight": 2.0}],
                "merge": "cat",
                "prompt": "Hi",
                "max_new_tokens": 2,
            },
        ),
        ("/generate", {"adapter": "gen-qv-r8", "prompt": "Hello", "stop": ["x"], "max_new_tokens": 2}),
        (
            "/generate",
            {"messages": [{"role": "user", "content": "Hi"}], "json_schema": schema, "max_new_tokens": 2},
        ),
        ("/generate", {"prompt": "Hi", "regex": "[a-z]+", "max_new_tokens": 2}),
        ("/v1/completions", {"model": model, "prompt": ["one", "two"], "stop": "x", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
                "tools": [tool],
                "tool_choice": "none",
                "user": "someone",
                "max_tokens": 2,
            },
        ),
        (
            "/admin/compositions",
            {"name": "comp-x", "members": ["gen-qv-r8", "gen-pattern"], "method": "average"},
        ),
    ]


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every string in a JSON value (dict keys are not leaves)."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


def _replaced(body: Any, path: tuple[Any, ...], text: str) -> Any:
    copy = json.loads(json.dumps(body))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = text
    return copy


def _cases() -> list[tuple[str, dict[str, Any], tuple[Any, ...]]]:
    return [(route, body, path) for route, body in _bodies("MODEL") for path in _leaves(body)]


@pytest.mark.parametrize(
    ("route", "body", "path"), _cases(), ids=lambda v: str(v) if isinstance(v, str) else None
)
def test_a_lone_surrogate_in_any_text_field_is_a_clear_4xx(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    route: str,
    body: dict[str, Any],
    path: tuple[Any, ...],
) -> None:
    model = client.app.state.model_id  # type: ignore[attr-defined]
    body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(model)))
    headers = {"Content-Type": "application/json", **admin_headers()}
    valid = client.post(route, content=json.dumps(body), headers=headers)
    assert valid.status_code in (200, 201), valid.text  # the body is valid as it is
    if route == "/admin/compositions":
        client.delete(f"/admin/compositions/{body['name']}", headers=admin_headers())
    # json.dumps writes the lone surrogate as the escape "\ud800": valid JSON, not valid Unicode
    resp = client.post(route, content=json.dumps(_replaced(body, path, SURROGATE)), headers=headers)
    openai = route.startswith("/v1/")
    assert resp.status_code == (400 if openai else 422), resp.text
    err = resp.json()["error"]
    assert err["type"] == ("invalid_request_error" if openai else "invalid_request")
    where = ".".join(str(p) for p in path)
    assert f"{where} holds a lone UTF-16 surrogate at character 1" in err["message"], err
    assert err["param"] == where, err  # the string's own path, as OpenAI's param names a field


def test_a_lone_surrogate_in_a_key_and_in_paths(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    body = '{"prompt": "Hi", "json_schema": {"type": "object", "properties": {"\\udc00": {}}}}'
    resp = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and "lone UTF-16 surrogate" in resp.json()["error"]["message"], resp.text
    # a path holding the UTF-8 bytes of a surrogate is no adapter name: the same 404 as any unknown name
    for path in ("/v1/adapters/%ED%A0%80", "/v1/models/%ED%A0%80"):
        resp = client.get(path)
        assert resp.status_code == 404, resp.text
    resp = client.request("DELETE", "/admin/adapters/%ED%A0%80", headers=admin_headers())
    assert resp.status_code == 404, resp.text
    # and the service still serves
    ok = client.post("/generate", json={"adapter": "gen-qv-r8", "prompt": "Hello", "max_new_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text
