"""Batching must not change results: concurrency, streaming, cancellation (real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import BUSY_TOKENS
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter

GEN = ["gen-qv-r8", "gen-all-rslora", "gen-pattern"]


def _gen(adapter: str | None, prompt: str, n: int = 10, **kw: Any) -> dict[str, Any]:
    return {"adapter": adapter, "prompt": prompt, "max_new_tokens": n, **kw}


async def _post_all(url: str, reqs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        resps = await asyncio.gather(*(http.post(path, json=body) for path, body in reqs))
    for r in resps:
        assert r.status_code == 200, r.text
    return [r.json() for r in resps]


def test_greedy_generation_alone_equals_among_8_concurrent(
    live_url: str, uploaded: dict[str, RefAdapter]
) -> None:
    target = _gen("gen-all-rslora", GENERATE_PROMPTS[1], 12)
    others = [
        ("/generate", _gen(GEN[i % 3] if i % 4 else None, f"Story number {i}: once", 4 + 3 * i))
        for i in range(8)
    ] + [("/classify", {"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})]
    (alone,) = asyncio.run(_post_all(live_url, [("/generate", target)]))
    mixed = asyncio.run(_post_all(live_url, [*others[:4], ("/generate", target), *others[4:]]))
    assert mixed[4]["text"] == alone["text"]
    assert mixed[4]["text"].startswith(uploaded["gen-all-rslora"].texts[GENERATE_PROMPTS[1]])


def test_an_idle_engine_keeps_no_copy_of_a_mixed_batchs_adapters(
    live_url: str, client: TestClient, uploaded: dict[str, RefAdapter]
) -> None:
    """A decode step of several adapters lays their weights out anew (kept while its batch runs);
    once the engine is idle those copies are freed, and the next mixed batch answers the same."""
    engine: Any = client.app.state.engine  # type: ignore[attr-defined]
    groups = [
        g for layer in engine.runner.one_row.layers for g in (layer.qkv, layer.o, layer.gate_up, layer.down)
    ]

    def copies() -> int:
        kept = [
            m for m in engine.slots.layers.values() if m._gathered is not None or m._side_by_side is not None
        ]
        return len(kept) + sum(g.mixed is not None for g in groups)

    reqs = [("/generate", _gen(GEN[i % 3], f"Story number {i}: once", 8, min_tokens=8)) for i in range(6)]
    first = asyncio.run(_post_all(live_url, reqs))
    deadline = time.monotonic() + 5
    while copies() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert copies() == 0
    assert [r["text"] for r in asyncio.run(_post_all(live_url, reqs))] == [r["text"] for r in first]


def test_classification_alone_equals_among_8_concurrent(
    live_url: str, uploaded: dict[str, RefAdapter]
) -> None:
    target = {"adapter": "cls-pattern", "inputs": CLASSIFY_TEXTS}
    others = [
        ("/classify", {"adapter": ["cls-4", "cls-pattern"][i % 2], "inputs": [f"text {i}"] * (i + 1)})
        for i in range(6)
    ] + [("/generate", _gen(g, "Hi", 6)) for g in GEN[:2]]
    (alone,) = asyncio.run(_post_all(live_url, [("/classify", target)]))
    mixed = asyncio.run(_post_all(live_url, [*others[:3], ("/classify", target), *others[3:]]))
    for a, m in zip(alone["results"], mixed[3]["results"], strict=True):
        for label, score in a["scores"].items():
            assert abs(m["scores"][label] - score) <= 1e-4


def test_identical_concurrent_requests_give_identical_outputs(
    live_url: str, uploaded: dict[str, RefAdapter]
) -> None:
    greedy = _gen("gen-qv-r8", GENERATE_PROMPTS[0], 10)
    sampled = _gen("gen-pattern", "Tell me a joke.", 10, temperature=0.9, top_p=0.9, seed=11)
    out = asyncio.run(_post_all(live_url, [("/generate", greedy)] * 6 + [("/generate", sampled)] * 6))
    assert len({o["text"] for o in out[:6]}) == 1
    assert out[0]["text"] == uploaded["gen-qv-r8"].texts[GENERATE_PROMPTS[0]]
    assert len({o["text"] for o in out[6:]}) == 1


def _read_stream(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("stop", [[], ["the"], [" a"]])
def test_streaming_equals_non_streaming(
    client: TestClient, uploaded: dict[str, RefAdapter], stop: list[str]
) -> None:
    body = _gen("gen-all-rslora", GENERATE_PROMPTS[0], 12, stop=stop)
    plain = client.post("/generate", json=body).json()
    events = _read_stream(client, body)
    assert "".join(e["text"] for e in events) == plain["text"]
    assert events[-1]["finish_reason"] == plain["finish_reason"]
    # (the second of the two finds the prompt in the prefix cache)
    assert events[-1]["usage"] | {"cached_tokens": 0} == plain["usage"] | {"cached_tokens": 0}
    assert all("finish_reason" not in e for e in events[:-1])


def test_streaming_errors_before_the_stream_are_http_errors(
    client: TestClient, uploaded: dict[str, RefAdapter]
) -> None:
    resp = client.post("/generate", json={"adapter": "nope", "prompt": "x", "stream": True})
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "adapter_not_found"


def test_a_cancelled_stream_frees_its_slot(
    live_url: str, client: TestClient, uploaded: dict[str, RefAdapter]
) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    body = {**_gen("gen-qv-r8", "Write a very long essay about the sea.", BUSY_TOKENS), "stream": True}
    with (
        httpx.Client(base_url=live_url, timeout=60) as http,
        http.stream("POST", "/generate", json=body) as resp,
    ):
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "text" in json.loads(first[6:]), first
        assert "finish_reason" not in json.loads(first[6:]), first
        deadline = time.monotonic() + 5  # the row joins the running batch right after its prefill
        while engine.running_generations != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.running_generations == 1
    deadline = time.monotonic() + 10  # the client hung up: its row must leave at the next step
    while engine.running_generations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running_generations == 0
    # and the engine keeps serving
    assert (
        client.post("/generate", json=_gen("gen-qv-r8", GENERATE_PROMPTS[0], 10)).json()["text"]
        == (uploaded["gen-qv-r8"].texts[GENERATE_PROMPTS[0]])
    )
