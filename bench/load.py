"""Open-loop HTTP load test: Poisson arrivals of mixed-adapter requests against a live server.

    python -m bench.load [--rate 4] [--duration 30] [--adapters 8]

Starts ``adapterserve serve`` on a free loopback port with a temporary store of rank-16
all-linear adapters (half classification, half generation), sends requests at exponentially
distributed intervals (the sender never waits for answers), then prints throughput and the
latency / time-to-first-token percentiles. Everything stays on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from app.config import Settings
from app.models.base_lm import resolve_model_path
from bench.common import PROMPT, TEXT, make_peft, pct, save_adapters
from bench.server import running_server

LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def make_store(n: int, rank: int) -> Path:
    path, _ = resolve_model_path("", Settings().cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix="adapterserve-load-"))
    store = tmp / "store"
    store.mkdir()
    for task, labels in (("classify", LABELS), ("generate", None)):
        peft = make_peft(path, task, n, rank, torch.float32, torch.device("cpu"))
        for folder in save_adapters(peft, tmp / task, n, labels):
            folder.rename(store / f"{task[:3]}-{folder.name}")
        del peft
    return store


async def _classify(http: httpx.AsyncClient, adapter: str, out: dict[str, list[Any]]) -> None:
    start = time.perf_counter()
    resp = await http.post("/classify", json={"adapter": adapter, "inputs": [TEXT]})
    out["status"].append(resp.status_code)
    if resp.status_code == 200:
        out["cls_latency"].append(time.perf_counter() - start)


async def _generate(http: httpx.AsyncClient, adapter: str, tokens: int, out: dict[str, list[Any]]) -> None:
    start = time.perf_counter()
    body = {"adapter": adapter, "prompt": PROMPT, "max_new_tokens": tokens, "stream": True}
    first: float | None = None
    async with http.stream("POST", "/generate", json=body) as resp:
        out["status"].append(resp.status_code)
        if resp.status_code != 200:
            await resp.aread()
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("text"):
                first = time.perf_counter() - start
            if "usage" in event:
                out["tokens"].append(event["usage"]["completion_tokens"])
    out["gen_latency"].append(time.perf_counter() - start)
    if first is not None:
        out["ttft"].append(first)


async def _run(url: str, args: argparse.Namespace) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ("status", "cls_latency", "gen_latency", "ttft", "tokens")}
    rng = random.Random(0)
    tasks = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        start = time.perf_counter()
        while time.perf_counter() - start < args.duration:
            k = rng.randrange(args.adapters)
            if rng.random() < 0.5:
                tasks.append(asyncio.create_task(_classify(http, f"cla-a{k}", out)))
            else:
                tasks.append(asyncio.create_task(_generate(http, f"gen-a{k}", args.new_tokens, out)))
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
        out["elapsed"] = [time.perf_counter() - start]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--adapters", type=int, default=8, help="adapters per task")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    store = make_store(args.adapters, args.rank)
    try:
        with running_server(store) as (_, url):
            out = asyncio.run(_run(url, args))
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    elapsed = out["elapsed"][0]
    ok = sum(1 for s in out["status"] if s == 200)
    print(
        f"\nopen loop: {args.rate:g} req/s for {args.duration:g} s, {args.adapters} classify + "
        f"{args.adapters} generate adapters (rank {args.rank}), {args.new_tokens} new tokens, streamed"
    )
    print(
        f"requests sent {len(out['status'])}, ok {ok}, other statuses "
        f"{sorted({s for s in out['status'] if s != 200})}; throughput {ok / elapsed:.2f} req/s, "
        f"{sum(out['tokens']) / elapsed:.1f} generated tokens/s"
    )
    print("\n| metric | p50 | p95 | p99 | mean |\n|---|---:|---:|---:|---:|")
    for name, key in (
        ("classify latency (s)", "cls_latency"),
        ("generate latency (s)", "gen_latency"),
        ("time to first token (s)", "ttft"),
    ):
        v = out[key]
        mean = statistics.fmean(v) if v else float("nan")
        print(f"| {name} | {pct(v, 0.5):.3f} | {pct(v, 0.95):.3f} | {pct(v, 0.99):.3f} | {mean:.3f} |")


if __name__ == "__main__":
    main()
