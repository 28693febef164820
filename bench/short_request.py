"""Where the time of a one-token request goes, hop by hop.

    python -m bench.short_request [--repeats 30] [--quantization auto]

A server on the default base (its process, over HTTP): ``GET /healthz`` (HTTP and the ASGI stack
alone), ``POST /generate`` with the prompt "Hi" and one new token, and the same text as chat
messages (the chat template and its longer prompt), each the median of ``--repeats`` in turns. Then
in this process, on the same base: the chat template rendered, the prompt tokenized, the request
handed to the engine loop and answered (``Engine.generate``: queue, wake-up, prefill, sampling, the
way back), and the prefill forward alone of the same tokens. Prints a table of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import Generation, SamplingParams
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from bench.common import machine_line
from bench.server import running_server

MESSAGES = [{"role": "user", "content": "Hi"}]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def over_http(quantization: str, repeats: int) -> dict[str, float]:
    store = Path(tempfile.mkdtemp(prefix="adapterserve-short-"))
    try:
        with (
            running_server(store, store / "log", quantization=quantization) as (_, url),
            httpx.Client(base_url=url, timeout=60) as http,
        ):
            model = http.get("/v1/models").json()["data"][0]["id"]
            calls: dict[str, Callable[[], object]] = {
                "GET /healthz": lambda: http.get("/healthz"),
                "POST /generate, prompt 'Hi', 1 token": lambda: http.post(
                    "/generate", json={"prompt": "Hi", "max_new_tokens": 1}
                ),
                "POST /generate, messages 'Hi', 1 token": lambda: http.post(
                    "/generate", json={"messages": MESSAGES, "max_new_tokens": 1}
                ),
                "POST /v1/chat/completions 'Hi', 1 token": lambda: http.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": MESSAGES, "max_tokens": 1},
                ),
            }
            for call in calls.values():  # warm
                call()
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(repeats):  # in turns
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def in_process(quantization: str, repeats: int) -> dict[str, float]:
    settings = Settings(quantization=quantization)
    base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "auto", settings.quantization)
    tok = base.tokenizer
    text = str(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    engine = Engine(base, settings, Metrics())
    engine.start()
    params = SamplingParams(max_new_tokens=1)

    async def generate() -> None:
        await engine.generate(Generation(ids, params))

    loop = asyncio.new_event_loop()
    try:
        out = {
            f"chat template rendered ({len(ids)} tokens)": median_ms(
                lambda: tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True), repeats
            ),
            "tokenized": median_ms(lambda: tok(text, add_special_tokens=False), repeats),
            "engine: queue, wake-up, prefill, way back": median_ms(
                lambda: loop.run_until_complete(generate()), repeats
            ),
        }
    finally:
        engine.stop()
        loop.close()
    model = base.model
    with torch.inference_mode():
        x = torch.tensor([ids])
        out["the prefill forward alone"] = median_ms(lambda: model(input_ids=x, logits_to_keep=1), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    http = over_http(args.quantization, args.repeats)
    local = in_process(args.quantization, args.repeats)
    print(machine_line())
    print(f"quantization {args.quantization}; medians of {args.repeats}\n")
    print("| hop | ms |")
    print("|---|---:|")
    for name, ms in (http | local).items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
