"""Whether a generation request that arrives while another decodes joins the running batch."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.conftest import serve_live


def generate_batches(client: TestClient) -> tuple[float, float]:
    """(forwards, rows) of generation batches so far, from the batch-size histogram."""
    count = total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('adapterserve_batch_size_count{task="generate"}'):
            count = float(line.split()[-1])
        elif line.startswith('adapterserve_batch_size_sum{task="generate"}'):
            total = float(line.split()[-1])
    return count, total


def assert_joins_running_batch(
    client: TestClient, long_prompt: str, short: dict[str, Any], short_text: str, long_tokens: int = 200
) -> None:
    """Stream a long bare-base generation; once it has produced text, send ``short``: it must finish
    before the long one ends (admitted into the running batch, not queued behind it), with the text
    ``short_text``, and the long stream's text must equal the same request run alone."""
    long_body = {"prompt": long_prompt, "max_new_tokens": long_tokens}
    alone = client.post("/generate", json=long_body).json()
    assert alone["finish_reason"] == "length", "the base stopped early; pick another prompt"
    before = generate_batches(client)
    events: list[tuple[float, dict[str, Any]]] = []
    started = threading.Event()
    with serve_live(client.app) as url:

        def stream() -> None:
            body = {**long_body, "stream": True}
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append((time.monotonic(), json.loads(line[len("data: ") :])))
                        started.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(120)
        resp = httpx.post(f"{url}/generate", json=short, timeout=300)
        short_done = time.monotonic()
        thread.join(300)
    assert resp.status_code == 200 and resp.json()["text"] == short_text, resp.text
    assert "".join(e["text"] for _, e in events) == alone["text"]
    assert events[-1][0] > short_done, "the short request waited for the long one to finish"
    forwards, rows = (a - b for a, b in zip(generate_batches(client), before, strict=True))
    assert rows > forwards, "no generation step ran the two requests together"
