"""Backpressure and shutdown: a full queue answers 503 at once, deadlines 504, stop drains work."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.types import Generation, SamplingParams
from app.errors import NotReady
from app.main import create_app
from app.models.base_lm import load_base_model
from tests.conftest import CACHE_DIR
from tests.helpers.peft_ref import GENERATE_PROMPTS, RefAdapter


@pytest.fixture(scope="module")
def small_client(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("small-store")
    shutil.copytree(ref_adapters["gen-qv-r8"].folder, store / "gen-qv-r8")
    settings = Settings(store=store, max_queue=2, max_batch_size=1, request_timeout_s=30, device="cpu")
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    with TestClient(create_app(settings, base=base)) as c:
        yield c


def test_queue_full_is_503_with_retry_after_and_nothing_else_breaks(
    small_client: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 200}
    with ThreadPoolExecutor(12) as pool:
        resps = list(pool.map(lambda _: small_client.post("/generate", json=body), range(12)))
    rejected = [r for r in resps if r.status_code == 503]
    served = [r for r in resps if r.status_code == 200]
    assert rejected and served and len(rejected) + len(served) == 12
    for r in rejected:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "queue_full"
    expected = ref_adapters["gen-qv-r8"].texts[GENERATE_PROMPTS[0]]
    (text,) = {r.json()["text"] for r in served}  # every served request gives the same text
    assert text.startswith(expected)
    after = small_client.post("/generate", json=body)
    assert after.status_code == 200 and after.json()["text"] == text
    assert small_client.get("/readyz").status_code == 200


def test_deadline_is_504(small_client: TestClient) -> None:
    """A deadline that passes before the request produced a token: 504 (with tokens: see
    test_deadline_cutoff.py)."""
    engine = small_client.app.state.engine  # type: ignore[attr-defined]
    old = engine.settings.request_timeout_s
    engine.settings.request_timeout_s = 0.0  # the deadline passes before the engine first sees the work
    try:
        resp = small_client.post("/generate", json={"prompt": "Tell me a story.", "max_new_tokens": 60})
    finally:
        engine.settings.request_timeout_s = old
    assert resp.status_code == 504 and resp.json()["error"]["type"] == "deadline_exceeded"


def test_stop_drains_running_requests_then_refuses(base_path: Path, tmp_path: Path) -> None:
    from app.engine.engine import Engine
    from app.metrics import Metrics

    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    engine = Engine(base, Settings(store=tmp_path), Metrics())
    engine.start()
    prompt = base.tokenizer(GENERATE_PROMPTS[0])["input_ids"]

    async def run() -> str:
        task = asyncio.ensure_future(engine.generate(Generation(prompt, SamplingParams(max_new_tokens=12))))
        await asyncio.sleep(0.2)  # running now
        await asyncio.to_thread(engine.stop)
        result = await task
        return result.text

    text = asyncio.run(run())
    assert text  # the request admitted before shutdown finished
    with pytest.raises(NotReady):
        asyncio.run(engine.generate(Generation(prompt, SamplingParams(max_new_tokens=2))))


def test_chunked_prefill_matches_and_interleaves_with_decoding(base_path: Path, tmp_path: Path) -> None:
    """A long prompt prefilled in 64-token chunks gives the same greedy text as in one piece, and
    a running generation keeps producing tokens while it is prefilled."""
    import threading
    import time

    from app.engine.engine import Engine
    from app.engine.types import StreamDelta
    from app.metrics import Metrics

    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    tok = base.tokenizer
    long_prompt = tok(" ".join(["The history of the city is long and full of surprises."] * 30))["input_ids"]
    assert len(long_prompt) > 300
    short_prompt = tok(GENERATE_PROMPTS[1])["input_ids"]

    def run(max_prefill: int) -> tuple[str, int]:
        engine = Engine(base, Settings(store=tmp_path, max_prefill_tokens=max_prefill), Metrics())
        engine.start()
        short: list[float] = []
        long_first: list[float] = []
        started, done = threading.Event(), threading.Event()
        text: list[str] = []

        def short_sink(delta: StreamDelta) -> None:
            short.append(time.monotonic())
            started.set()

        def long_sink(delta: StreamDelta) -> None:
            long_first.append(time.monotonic())
            if delta.result is not None:
                text.append(delta.result.text)
                done.set()

        try:
            engine.submit(
                # long enough to be running still whenever the long prompt arrives
                Generation(short_prompt, SamplingParams(max_new_tokens=400, ignore_eos=True)),
                short_sink,
            )
            assert started.wait(30)
            submitted = time.monotonic()
            engine.submit(
                Generation(long_prompt, SamplingParams(max_new_tokens=4, ignore_eos=True)), long_sink
            )
            assert done.wait(60)
        finally:
            engine.stop()
        # tokens the short request got between the long one's arrival and its first token
        return text[0], sum(1 for t in short if submitted < t < long_first[0])

    whole, during_whole = run(4096)
    chunked, during_chunked = run(64)
    assert chunked == whole
    assert during_whole <= 2  # one prefill forward in one piece
    assert during_chunked >= 4  # decode steps ran between the 64-token chunks


def test_preload_puts_adapters_on_the_device_at_start(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    shutil.copytree(ref_adapters["gen-qv-r8"].folder, tmp_path / "gen-qv-r8")
    shutil.copytree(ref_adapters["cls-4"].folder, tmp_path / "cls-4")
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    settings = Settings(store=tmp_path, preload="gen-qv-r8")
    with TestClient(create_app(settings, base=base)) as client:
        tiers = {a["name"]: a["tier"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert tiers == {"gen-qv-r8": "device", "cls-4": "store"}
        body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 10}
        assert (
            client.post("/generate", json=body).json()["text"]
            == ref_adapters["gen-qv-r8"].texts[GENERATE_PROMPTS[0]]
        )
