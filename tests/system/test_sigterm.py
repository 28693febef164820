"""Graceful shutdown of the real process: on SIGTERM, requests already running finish with their
full answer, nothing new is admitted, and the process exits 0; a request longer than the grace
period is cut off at its end (with the text it has: finish_reason timeout, no traceback in the log)
and the process still exits 0 in time."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.server import running_server
from tests.helpers.peft_ref import GENERATE_PROMPTS, RefAdapter

pytestmark = pytest.mark.usefixtures("tiny_base_env")  # servers of the tiny model
LONG = 400  # new tokens of a generation running across the signal


def _post_in_thread(url: str, body: dict[str, Any], out: dict[str, Any]) -> threading.Thread:
    def post() -> None:
        try:
            out["resp"] = httpx.post(f"{url}/generate", json=body, timeout=120)
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _wait_running(url: str) -> None:
    """Until the engine reports a generation row running (its batch-size histogram moved)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if 'adapterserve_batch_size_count{task="generate"} 0.0' not in text:
            return
        time.sleep(0.05)
    raise AssertionError("the generation did not start")


@pytest.fixture()
def store(ref_adapters: dict[str, RefAdapter], tmp_path: Path) -> Path:
    shutil.copytree(ref_adapters["gen-qv-r8"].folder, tmp_path / "store" / "gen-qv-r8")
    return tmp_path / "store"


def test_sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_0(
    store: Path, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    # ~1 s on the tiny model: still running when the signal comes
    body = {"adapter": "gen-qv-r8", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": LONG}
    server = running_server(
        store, tmp_path / "log", device="cpu", shutdown_grace_s="60", max_new_tokens="512"
    )
    with server as (proc, url):
        out: dict[str, Any] = {}
        thread = _post_in_thread(url, body, out)
        _wait_running(url)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # the listener is closed (or, while it closes, the answer is 503)
            late = httpx.post(f"{url}/generate", json={**body, "max_new_tokens": 2}, timeout=10)
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass
        thread.join(120)
        assert proc.wait(60) == 0
    resp = out["resp"]
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["text"].startswith(ref_adapters["gen-qv-r8"].texts[GENERATE_PROMPTS[0]])
    assert result["usage"]["completion_tokens"] == LONG or result["finish_reason"] == "stop"


def test_a_request_longer_than_the_grace_period_is_cut_and_the_process_exits_0(
    store: Path, tmp_path: Path
) -> None:
    # sampled, with no end-of-sequence token before the last (min_tokens): ~5 s on the tiny model
    body = {
        "adapter": "gen-qv-r8",
        "prompt": "Once",
        "max_new_tokens": 2000,
        "min_tokens": 2000,
        "temperature": 1.5,
        "seed": 3,
    }
    with running_server(
        store, tmp_path / "log", device="cpu", shutdown_grace_s="2", max_new_tokens="2000"
    ) as (proc, url):
        out: dict[str, Any] = {}
        thread = _post_in_thread(url, body, out)
        _wait_running(url)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        took = time.monotonic() - start
        thread.join(60)
    resp = out["resp"]
    assert resp.status_code == 200, resp.text[-300:]
    result = resp.json()
    assert result["finish_reason"] == "timeout" and 0 < result["usage"]["completion_tokens"] < 2000
    assert result["text"]
    assert took < 30, f"exit took {took:.1f} s with a grace period of 2 s"
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-2000:]
