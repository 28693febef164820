"""Tenant limits and fair admission through HTTP on the tiny model: over a limit is 429 with
Retry-After and OpenAI's x-ratelimit headers (OpenAI's error shape on /v1/*), and it recovers once
the window passed; one tenant's full share of the queue does not turn another tenant away, and the
other tenant's request runs before the flood's queued ones."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from app.models.base_lm import BaseLM
from app.tenants import key_hash
from tests.api.conftest import BUSY_TOKENS
from tests.conftest import app_settings, upload_all
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter

KEYS = {"metered": "metered-key-1", "thrifty": "thrifty-key-2", "single": "single-key-3"}
KEYS |= {"flood": "flood-key-4", "quiet": "quiet-key-5"}
TOKENS_PER_MINUTE = 600  # 10 a second
TENANTS = {
    "metered": {"limits": {"requests_per_second": 2}},
    "thrifty": {"limits": {"tokens_per_minute": TOKENS_PER_MINUTE}},
    "single": {"limits": {"concurrent": 1}},
    "flood": {},
    "quiet": {},
}


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def app(
    own_tiny: BaseLM, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("limits")
    tenants = {
        name: {"keys": [key_hash(KEYS[name])], "adapters": ["*"], **spec} for name, spec in TENANTS.items()
    }
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    # a small batch and queue: 5 tenants of weight 1 share 10 queue places, 2 each
    settings = app_settings(
        folder / "store",
        tenants_file=folder / "tenants.yaml",
        max_batch_size=2,
        max_queue=10,
        max_new_tokens=BUSY_TOKENS,
    )
    with TestClient(create_app(settings, base=own_tiny)) as client:
        upload_all(client, {k: ref_adapters[k] for k in ("cls-4", "gen-qv-r8")})
        yield client


def _generate(client: TestClient, tenant: str, tokens: int = 4, **extra: Any) -> Any:
    body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": tokens, **extra}
    return client.post("/generate", json=body, headers=_auth(tenant))


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"waited 30 s for {what}"
        time.sleep(0.02)


def test_requests_per_second_429_with_openai_headers_then_recovery(app: TestClient) -> None:
    time.sleep(1.0)  # a full bucket
    first = app.get("/v1/models", headers=_auth("metered"))
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert _generate(app, "metered").status_code == 200
    refused = app.post(
        "/v1/completions",
        json={"model": "gen-qv-r8", "prompt": "Hi", "max_tokens": 2},
        headers=_auth("metered"),
    )
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "requests"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("ms")
    native = _generate(app, "metered")  # native routes: the native error shape
    assert native.status_code == 429 and native.json()["error"]["type"] == "rate_limit_exceeded"
    time.sleep(0.6)  # one request's worth came back
    assert _generate(app, "metered").status_code == 200
    assert _generate(app, "quiet").status_code == 200  # the others were never limited
    assert "x-ratelimit-limit-requests" not in _generate(app, "quiet").headers
    metrics = app.get("/metrics").text
    assert 'adapterserve_tenant_rejections_total{limit="requests",tenant="metered"} 2.0' in metrics


def test_tokens_per_minute_count_prompt_and_generated_tokens(app: TestClient) -> None:
    first = _generate(app, "thrifty", tokens=8, min_tokens=8)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(TOKENS_PER_MINUTE)  # charged after
    used = first.json()["usage"]["prompt_tokens"] + 8
    second = app.get("/v1/models", headers=_auth("thrifty"))
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert TOKENS_PER_MINUTE - used <= remaining <= TOKENS_PER_MINUTE - used + 2  # (refilled meanwhile)
    # one classification of many texts overdraws the bucket: the next request waits for the refill
    texts = [CLASSIFY_TEXTS[0] * 8] * 8
    big = app.post("/classify", json={"adapter": "cls-4", "inputs": texts}, headers=_auth("thrifty"))
    assert big.status_code == 200 and big.json()["usage"]["input_tokens"] > remaining
    refused = _generate(app, "thrifty")
    assert refused.status_code == 429 and refused.json()["error"]["message"].endswith("tokens per minute")
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    metrics = app.get("/metrics").text
    assert 'adapterserve_tenant_rejections_total{limit="tokens",tenant="thrifty"} 1.0' in metrics
    prompt_tokens = big.json()["usage"]["input_tokens"] + first.json()["usage"]["prompt_tokens"]
    assert f'adapterserve_tenant_tokens_total{{kind="prompt",tenant="thrifty"}} {prompt_tokens}.0' in metrics
    assert 'adapterserve_tenant_tokens_total{kind="generated",tenant="thrifty"} 8.0' in metrics


def test_concurrent_requests_until_the_stream_ends(app: TestClient) -> None:
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(_generate, app, "single", BUSY_TOKENS, min_tokens=BUSY_TOKENS)
        engine = app.app.state.engine  # type: ignore[attr-defined]
        _until(lambda: engine.running_generations == 1, "the long generation")
        refused = _generate(app, "single")
        assert refused.status_code == 429 and refused.json()["error"]["message"].endswith("its limit")
        assert long.result().status_code == 200
    assert _generate(app, "single").status_code == 200
    # a stream holds its place until its last event
    body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 4, "stream": True}
    streamed = app.post("/generate", json=body, headers=_auth("single"))
    assert streamed.status_code == 200 and '"finish_reason"' in streamed.text
    assert _generate(app, "single").status_code == 200


def test_a_full_queue_share_turns_away_only_its_own_tenant(app: TestClient) -> None:
    engine = app.app.state.engine  # type: ignore[attr-defined]
    alone = _generate(app, "quiet", tokens=6)
    assert alone.status_code == 200
    finished: list[str] = []

    def flood(i: int) -> int:  # (the two that wait in the queue need not be long)
        tokens = BUSY_TOKENS if i < 2 else 40
        resp = _generate(app, "flood", tokens, min_tokens=tokens)
        finished.append(f"flood{i}")
        return int(resp.status_code)

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(flood, i) for i in range(2)]  # the batch (2 rows)
        _until(lambda: engine.running_generations == 2, "the flood's batch")
        queued = [pool.submit(flood, i) for i in range(2, 4)]  # its share of the queue: 2 places
        _until(lambda: engine.waiting("flood") == 2, "the flood's queue share")
        over = _generate(app, "flood")
        assert over.status_code == 429, over.text
        assert "its share of the queue" in over.json()["error"]["message"]
        assert over.headers["retry-after"] == "1"
        quiet = _generate(app, "quiet", tokens=6)
        finished.append("quiet")
        statuses = [f.result() for f in running + queued]
    assert quiet.status_code == 200, quiet.text
    assert quiet.json()["text"] == alone.json()["text"] and alone.json()["usage"]["completion_tokens"] > 0
    assert statuses == [200] * 4
    # the quiet tenant joined the full batch: it finished before every flood request
    assert finished[0] == "quiet", finished
    metrics = app.get("/metrics").text
    assert 'adapterserve_tenant_rejections_total{limit="queue",tenant="flood"} 1.0' in metrics
    assert 'adapterserve_tenant_rejections_total{limit="queue",tenant="quiet"}' not in metrics


def test_priority_is_validated(app: TestClient) -> None:
    resp = _generate(app, "quiet", priority=10**9)
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "priority"
    assert _generate(app, "quiet", priority=-5).status_code == 200


def test_tenants_file_rejects_unknown_limits(tmp_path: Path) -> None:
    from app.tenants import parse_tenants

    with pytest.raises(ValueError, match="limits take"):
        parse_tenants(yaml.safe_dump({"tenants": {"a": {"keys": [], "limits": {"rpm": 3}}}}))
