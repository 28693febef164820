"""Faults: a failing forward fails only its batch (500, the engine goes on); forwards failing in a
row mean a broken device (the engine stops, /readyz 503); the number of open streams is bounded."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.generation import GenerationBatch
from app.main import create_app
from app.models.base_lm import load_base_model
from tests.api.conftest import BUSY_TOKENS
from tests.conftest import CACHE_DIR, serve_live
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter

DEVICE_ERROR = "CUDA error: an illegal memory access was encountered (injected)"


def _app(base_path: Path, store: Path, refs: dict[str, RefAdapter], **overrides: Any) -> TestClient:
    for name in ("cls-4", "gen-qv-r8"):
        if not (store / name).exists():
            shutil.copytree(refs[name].folder, store / name)
    settings = Settings(store=store, device="cpu", dtype="float32", max_new_tokens=BUSY_TOKENS, **overrides)
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    return TestClient(create_app(settings, base=base))


@pytest.fixture(scope="module")
def faults(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    with _app(base_path, tmp_path_factory.mktemp("faults"), ref_adapters, max_streams=1) as c:
        yield c


def _failing_once(real: Callable[..., Any], armed: threading.Event) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            armed.clear()
            raise RuntimeError(DEVICE_ERROR)
        return real(*args, **kwargs)

    return forward


def _classify(c: TestClient) -> httpx.Response:
    return c.post("/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})


def _failures(c: TestClient, task: str) -> float:
    metrics = c.app.state.metrics  # type: ignore[attr-defined]
    return float(metrics.forward_failures.labels(task=task)._value.get())


def _assert_scores(resp: httpx.Response, ref: RefAdapter) -> None:
    assert resp.status_code == 200, resp.text
    for result, probs in zip(resp.json()["results"], ref.probs, strict=True):
        for label, p in zip(ref.labels, probs, strict=True):
            assert abs(result["scores"][label] - p) <= 1e-4


def test_a_failing_classification_forward_fails_only_its_batch(
    faults: TestClient, ref_adapters: dict[str, RefAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = faults.app.state.engine.runner  # type: ignore[attr-defined]
    armed = threading.Event()
    monkeypatch.setattr(runner, "classify", _failing_once(runner.classify, armed))
    gen_body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[1], "max_new_tokens": BUSY_TOKENS}
    expected = ref_adapters["gen-qv-r8"].texts[GENERATE_PROMPTS[1]]
    with httpx.Client(timeout=120) as http, serve_live(faults.app) as url:
        # a generation runs in the engine while the classification batch beside it fails
        generation: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: generation.update(resp=http.post(f"{url}/generate", json=gen_body))
        )
        thread.start()
        time.sleep(0.3)
        armed.set()
        failed = http.post(f"{url}/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})
        thread.join(120)
    assert failed.status_code == 500
    assert failed.json()["error"] == {
        "type": "engine_error",
        "message": "the classification batch failed; see the server log",
        "param": None,
    }
    gen = generation["resp"]
    assert gen.status_code == 200 and gen.json()["text"][: len(expected)] == expected
    _assert_scores(_classify(faults), ref_adapters["cls-4"])  # the next batch is served
    assert faults.get("/readyz").status_code == 200
    assert _failures(faults, "classify") == 1


def test_a_failing_decode_step_fails_its_rows_and_the_engine_goes_on(
    faults: TestClient, ref_adapters: dict[str, RefAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    armed = threading.Event()
    armed.set()
    monkeypatch.setattr(GenerationBatch, "step", _failing_once(GenerationBatch.step, armed))
    body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 10}
    failed = faults.post("/generate", json=body)
    assert failed.status_code == 500
    assert failed.json()["error"]["message"] == "the generation batch failed; see the server log"
    text = faults.post("/generate", json=body).json()["text"]  # the next batch is served
    assert text and ref_adapters["gen-qv-r8"].texts[GENERATE_PROMPTS[0]].startswith(text)
    assert faults.get("/readyz").status_code == 200
    assert _failures(faults, "generate") == 1
    # the OpenAI routes report the same failure in OpenAI's shape
    armed.set()
    oa = faults.post("/v1/completions", json={"model": "gen-qv-r8", "prompt": "Hi", "max_tokens": 5})
    assert oa.status_code == 500 and oa.json()["error"]["type"] == "server_error"


def test_open_streams_are_bounded(faults: TestClient) -> None:
    body = {"prompt": "Write a very long essay about the sea.", "max_new_tokens": BUSY_TOKENS, "stream": True}
    with httpx.Client(timeout=120) as http, serve_live(faults.app) as url:
        with http.stream("POST", f"{url}/generate", json=body) as first:
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            second = http.post(f"{url}/generate", json=body)
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
            assert second.json()["error"]["type"] == "too_many_streams"
            oa = http.post(
                f"{url}/v1/completions",
                json={
                    "model": faults.app.state.model_id,  # type: ignore[attr-defined]
                    "prompt": "Hi",
                    "stream": True,
                },
            )
            assert oa.status_code == 503 and oa.json()["error"]["code"] == "too_many_streams"
            plain = http.post(f"{url}/generate", json={**body, "stream": False, "max_new_tokens": 3})
            assert plain.status_code == 200  # non-streamed requests are not limited by MAX_STREAMS
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert events[-1]["finish_reason"] in ("stop", "length")  # the first stream ran to its end
        again = http.post(f"{url}/generate", json={**body, "max_new_tokens": 3})
        assert again.status_code == 200 and again.text.endswith("data: [DONE]\n\n")


def test_forwards_failing_in_a_row_stop_the_engine_and_readiness(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    with _app(base_path, tmp_path, ref_adapters, max_consecutive_failures=3) as c:
        runner = c.app.state.engine.runner  # type: ignore[attr-defined]
        _assert_scores(_classify(c), ref_adapters["cls-4"])

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(DEVICE_ERROR)

        runner.classify = broken
        for _ in range(2):
            assert _classify(c).status_code == 500
            assert c.get("/readyz").status_code == 200  # still serving: each failure was one batch
        assert _classify(c).status_code == 500  # the third in a row: the device counts as broken
        deadline = time.monotonic() + 5
        while c.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        after = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2})
        assert after.status_code == 503 and after.json()["error"]["type"] == "not_ready"
        assert _failures(c, "classify") == 3
