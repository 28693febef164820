"""A generation cut off by its deadline returns the tokens it produced, marked finish_reason
"timeout": the same text as the prefix of the same greedy request run without a deadline (native
and OpenAI routes, streamed and not)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import BUSY_TOKENS

PROMPT = "Counting up: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # goes on past 64 tokens (no EOS)
TOKENS = BUSY_TOKENS  # 1-2 s on the tiny model, at least 0.5 s on any machine
DEADLINE_S = 0.3  # the first token comes in milliseconds, the last not before 0.5 s: a cut mid-way


@pytest.fixture(scope="module")
def full(client: TestClient) -> tuple[str, float]:
    """The uncut greedy text and how long it took."""
    start = time.perf_counter()
    resp = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": TOKENS})
    elapsed = time.perf_counter() - start
    body = resp.json()
    assert resp.status_code == 200 and body["finish_reason"] == "length", body  # no early EOS
    return body["text"], elapsed


@pytest.fixture
def short_deadline(client: TestClient, full: tuple[str, float]) -> Iterator[None]:
    """A deadline well inside the uncut run: the prefill is long done, the decoding under way."""
    settings = client.app.state.settings  # type: ignore[attr-defined]
    old = settings.request_timeout_s
    settings.request_timeout_s = DEADLINE_S
    try:
        yield
    finally:
        settings.request_timeout_s = old


def _sse(resp: Any) -> list[dict[str, Any]]:
    events = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _check(text: str, reason: str, tokens: int, full_text: str) -> None:
    assert reason == "timeout"
    assert 0 < tokens < TOKENS
    assert text and full_text.startswith(text) and len(text) < len(full_text)


@pytest.mark.usefixtures("short_deadline")
def test_native_cut_off_returns_the_prefix(client: TestClient, full: tuple[str, float]) -> None:
    resp = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": TOKENS})
    body = resp.json()
    assert resp.status_code == 200, body
    _check(body["text"], body["finish_reason"], body["usage"]["completion_tokens"], full[0])


@pytest.mark.usefixtures("short_deadline")
def test_native_stream_cut_off_returns_the_prefix(client: TestClient, full: tuple[str, float]) -> None:
    resp = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": TOKENS, "stream": True})
    events = _sse(resp)
    last = events[-1]
    text = "".join(e["text"] for e in events)
    _check(text, last["finish_reason"], last["usage"]["completion_tokens"], full[0])


@pytest.mark.usefixtures("short_deadline")
def test_openai_cut_off_returns_the_prefix(client: TestClient, full: tuple[str, float]) -> None:
    model = client.app.state.model_id  # type: ignore[attr-defined]
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    resp = client.post("/v1/completions", json=body)
    out = resp.json()
    assert resp.status_code == 200, out
    choice = out["choices"][0]
    _check(choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"], full[0])


@pytest.mark.usefixtures("short_deadline")
def test_openai_stream_cut_off_returns_the_prefix(client: TestClient, full: tuple[str, float]) -> None:
    model = client.app.state.model_id  # type: ignore[attr-defined]
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = _sse(client.post("/v1/completions", json=body))
    text = "".join(c["text"] for e in events for c in e["choices"])
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert reasons == ["timeout"]
    _check(text, reasons[0], events[-1]["usage"]["completion_tokens"], full[0])


def test_a_deadline_before_the_first_token_is_504(client: TestClient) -> None:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    old = settings.request_timeout_s
    settings.request_timeout_s = 0.0  # the deadline passes before the engine first sees the work
    try:
        native = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": TOKENS})
        streamed = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": TOKENS, "stream": True})
    finally:
        settings.request_timeout_s = old
    assert native.status_code == 504 and native.json()["error"]["type"] == "deadline_exceeded"
    assert _sse(streamed)[-1]["error"]["type"] == "deadline_exceeded"
