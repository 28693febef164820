"""Property-based fuzzing of every route from the service's own OpenAPI schema (schemathesis).

Each operation gets ``FUZZ_EXAMPLES`` generated requests (default 8; ``make fuzz`` runs many more),
valid and invalid ones, admin routes with the valid token, on the tiny model (the checks are of the
HTTP contract, not of numerics). Half the bodies name a served adapter; a third of those get a lone
UTF-16 surrogate in one of their strings (valid JSON, not valid Unicode: a 4xx). A 5xx answer, an
undocumented status code or content type, or a body that does not match the documented schema
fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks as st_checks
from schemathesis.specs.openapi import checks as oa_checks

from app.config import Settings
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, CACHE_DIR
from tests.helpers.peft_ref import RefAdapter

MAX_NEW_TOKENS = 6
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
CHECKS = [
    st_checks.not_a_server_error,
    oa_checks.status_code_conformance,
    oa_checks.content_type_conformance,
    oa_checks.response_headers_conformance,
    oa_checks.response_schema_conformance,
    oa_checks.negative_data_rejection,
]


class _LifespanOwnedElsewhere:
    """The app with its lifespan run by the fixture's TestClient (one engine per base model)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"{message['type']}.complete"})
                if kind == "shutdown":
                    return
        await self.app(scope, receive, send)


# The schema is read from the app before any fixture runs; the fixture then points the app at a
# temporary store with one adapter of each task and runs its lifespan (loading the base model).
_SETTINGS = Settings(
    admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
    max_new_tokens=MAX_NEW_TOKENS,
    max_input_tokens=256,
    max_inputs_per_request=8,
    max_upload_bytes=1 << 20,
    device="cpu",
    dtype="float32",
    cache_dir=CACHE_DIR,
)
_APP = create_app(_SETTINGS)
schema = schemathesis.openapi.from_asgi("/openapi.json", _LifespanOwnedElsewhere(_APP))
SERVED = ("cls-4", "gen-qv-r8")


@schema.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    """Random adapter names almost never exist: half the time, name a served adapter (or the base
    model's id) and keep the token count within the cap, so that generated requests reach the engine."""
    if not isinstance(body, dict):
        return st.just(body)
    key = next((k for k in ("adapter", "model") if isinstance(body.get(k), str)), None)
    if key is None:
        return st.just(body)
    names = [*SERVED, _APP.state.model_id or SERVED[0]]

    def served(name: str, tokens: int) -> dict[str, Any]:
        out = {**body, key: name}
        if key == "adapter" and "inputs" not in out:  # /generate: exactly one of prompt and messages
            if "messages" in out and "prompt" in out:
                del out["messages"]
            elif "messages" not in out:
                out["prompt"] = out.get("prompt") or "Hello"
        for cap in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            if isinstance(out.get(cap), int) and out[cap] > MAX_NEW_TOKENS:
                out[cap] = tokens
        return out

    as_served = st.builds(served, st.sampled_from(names), st.integers(1, MAX_NEW_TOKENS))
    surrogate = st.builds(with_surrogate, as_served, st.integers(0, 1 << 16), st.sampled_from(SURROGATES))
    return st.one_of(st.just(body), as_served, surrogate)


SURROGATES = ("\ud800", "\udfff", "\udbff")


def with_surrogate(body: dict[str, Any], pick: int, surrogate: str) -> dict[str, Any]:
    """``body`` with a lone surrogate in one of its strings (chosen by ``pick``), or as it is."""
    paths: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, str):
            paths.append(path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, (*path, i))

    walk(body, ())
    if not paths:
        return body
    path = paths[pick % len(paths)]
    out = json.loads(json.dumps(body))
    target = out
    for key in path[:-1]:
        target = target[key]
    text = target[path[-1]]
    target[path[-1]] = text[:1] + surrogate + text[1:]
    return dict(out)


@pytest.fixture(scope="module")
def served(
    tiny_path: Path, tiny_ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    store = tmp_path_factory.mktemp("fuzz-store")
    for name in ("gen-qv-r8", "cls-4"):
        shutil.copytree(tiny_ref_adapters[name].folder, store / name)
    _SETTINGS.store = store
    _SETTINGS.base_model = str(tiny_path)
    with TestClient(_APP):
        yield


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("FUZZ_RANDOM") is None,
)
def test_no_server_error_and_every_response_matches_the_schema(case: Any, served: None) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)
