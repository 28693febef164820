"""Conversations: time to the first token with the prefix cache, against llama.cpp's prompt cache.

    python -m bench.conversations [--repeats 5] [--sessions 16] [--turns 6] [--quantization auto]

Three servers on the same cores, each its own process: adapterserve with its prefix cache (a
rank-16 LoRA adapter, ``--quantization``), the same with ``ADAPTERSERVE_PREFIX_CACHE_BYTES=0``
(every prompt prefilled whole, as before the cache), and llama.cpp's server on the packaged Q4_1
GGUF of the same base (``cache_prompt`` on, its default; 16 slots). Over HTTP, the OpenAI chat
route, greedy:

- **short chat**: one line, one new token (the latency is the time to the first token), median of
  ``--repeats``;
- **6th turn**: a conversation of five turns (a system prompt, long user messages, the answers
  the server itself gave, ~1,000 tokens) is played, then a sixth question of one line is asked
  with one new token: cached (right after the five turns; a different sixth question each repeat) and cold
  (adapterserve: the server without the cache; llama.cpp: ``cache_prompt: false``);
- **sessions**: ``--sessions`` conversations of ``--turns`` turns at once, each turn streamed with
  24 new tokens: time to the first token p50 / p95 over every turn, and generated tokens/s.

Prints the table with the ratios the targets name, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import torch

from app.config import Settings
from app.models.sources import DEFAULT_BASE, packaged_path, resolve_model_path
from bench.common import machine_line, make_peft, save_adapters
from bench.llamacpp import worker
from bench.server import running_server

SYSTEM = (
    "You are the support assistant of an online shop that sells electronics. Answer briefly and "
    "politely, ask for an order number when you need one, and never promise refunds yourself."
)
WORDS = [
    *("order", "parcel", "delivery", "tracking", "refund", "invoice", "laptop", "charger", "screen"),
    *("battery", "warranty", "courier", "address", "payment", "account", "password", "monday"),
    *("tuesday", "week", "box", "damaged", "missing", "replacement", "store"),
]
ANSWER_TOKENS = 40  # of each of the five turns played before the sixth
SESSION_TOKENS = 24
# a connection per request, for every system (llama.cpp's server closes a connection after a stream)
FRESH = httpx.Limits(max_keepalive_connections=0)


def user_message(rng: random.Random, words: int) -> str:
    return "Hello, " + " ".join(rng.choice(WORDS) for _ in range(words)) + ". What should I do?"


async def ask(
    http: httpx.AsyncClient, model: str, messages: list[dict[str, str]], tokens: int, **extra: Any
) -> tuple[float, str, int]:
    """One streamed chat completion: time to its first token, its text, its completion tokens."""
    body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
    body |= {"stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first: float | None = None
    text, completion = "", 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
            if chunk.get("usage"):
                completion = int(chunk["usage"]["completion_tokens"])
    return (first if first is not None else time.perf_counter() - start), text, completion


async def play(
    http: httpx.AsyncClient, model: str, rng: random.Random, turns: int, words: int
) -> list[dict[str, str]]:
    """``turns`` turns of a conversation, each answered by the server: the history."""
    history = [{"role": "system", "content": SYSTEM}]
    for _ in range(turns):
        history.append({"role": "user", "content": user_message(rng, words)})
        _, text, _ = await ask(http, model, history, ANSWER_TOKENS)
        history.append({"role": "assistant", "content": text})
    return history


async def single(url: str, model: str, repeats: int, cold: dict[str, Any] | None) -> dict[str, float]:
    """Short chat and the sixth turn, cached and (``cold``: extra body fields) cold."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=FRESH) as http:
        short = [
            (await ask(http, model, [{"role": "user", "content": f"Hi! ({i})"}], 1))[0]
            for i in range(repeats + 1)
        ][1:]
        rng = random.Random(7)
        history = await play(http, model, rng, 5, 110)
        sixth = []
        for i in range(repeats):  # one line, as the short chat (a new one each time)
            question = {"role": "user", "content": f"And what about my refund? ({i})"}
            sixth.append((await ask(http, model, [*history, question], 1))[0])
        cold_times = []
        if cold is not None:
            for i in range(repeats):
                question = {"role": "user", "content": f"And the courier? ({i})"}
                cold_times.append((await ask(http, model, [*history, question], 1, **cold))[0])
    out = {"short": statistics.median(short), "sixth": statistics.median(sixth)}
    if cold_times:
        out["cold"] = statistics.median(cold_times)
    return out


async def sessions(url: str, model: str, n: int, turns: int) -> dict[str, float]:
    """``n`` conversations of ``turns`` turns at once."""
    ttfts: list[float] = []
    tokens = 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        rng = random.Random(100 + i)
        history = [{"role": "system", "content": SYSTEM}]
        for _ in range(turns):
            history.append({"role": "user", "content": user_message(rng, 40)})
            first, text, completion = await ask(http, model, history, SESSION_TOKENS)
            ttfts.append(first)
            tokens += completion
            history.append({"role": "assistant", "content": text})

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(http, i) for i in range(n)))
        wall = time.perf_counter() - start
    ttfts.sort()
    return {
        "p50": statistics.median(ttfts),
        "p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "tokens_per_s": tokens / wall,
    }


def llama_chat_worker(gguf: str, port: str, slots: str, ctx: str) -> None:
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = gguf
    p.n_parallel = int(slots)
    p.n_ctx = int(slots) * int(ctx)
    p.cpuparams.n_threads = os.cpu_count() or 2
    p.cpuparams_batch.n_threads = os.cpu_count() or 2
    p.hostnames = ["127.0.0.1"]
    p.port = int(port)
    server = xllamacpp.Server(p)
    print("llama.cpp server on", server.listening_address, flush=True)
    threading.Event().wait()


def _ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    cache = Settings().cache_dir
    hf_folder, _ = resolve_model_path("", cache)
    q4 = packaged_path(DEFAULT_BASE, cache)
    work = Path(tempfile.mkdtemp(prefix="adapterserve-conversations-"))
    results: dict[str, dict[str, float]] = {}
    try:
        peft = make_peft(hf_folder, "generate", 1, 16, torch.float32, torch.device("cpu"))
        (adapter,) = save_adapters(peft, work / "gen", 1)
        del peft
        store = work / "store"
        store.mkdir()
        shutil.copytree(adapter, store / "chat")
        systems: list[tuple[str, dict[str, str]]] = [
            ("adapterserve", {"quantization": args.quantization}),
            ("adapterserve, no prefix cache", {"quantization": args.quantization, "prefix_cache_bytes": "0"}),
        ]
        with ExitStack() as stack:
            urls = {
                label: stack.enter_context(running_server(store, work / f"{i}.log", **settings))[1]
                for i, (label, settings) in enumerate(systems)
            }
            _, urls["llama.cpp Q4_1"] = stack.enter_context(
                worker(
                    "llama-chat-worker",
                    [str(q4), "{port}", str(args.sessions), "2048"],
                    work / "llama.log",
                    "bench.conversations",
                )
            )
            args.format = httpx.get(urls["adapterserve"] + "/readyz").json()["quantization"]
            # the cold sixth turn: adapterserve's from the server without the cache
            for label, url in urls.items():
                cold = {"cache_prompt": False} if label.startswith("llama") else None
                results[label] = asyncio.run(single(url, "chat", args.repeats, cold))
            results["adapterserve"]["cold"] = results["adapterserve, no prefix cache"]["sixth"]
            for label, url in urls.items():
                results[label] |= asyncio.run(sessions(url, "chat", args.sessions, args.turns))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(results, args)


def _report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(machine_line())
    print(
        f"adapterserve quantization {args.quantization} ({args.format}), a rank-16 LoRA adapter; "
        f"llama.cpp Q4_1 (cache_prompt); medians of {args.repeats}; sessions: {args.sessions} × "
        f"{args.turns} turns, {SESSION_TOKENS} new tokens each\n"
    )
    print(
        "| system | short chat TTFT | 6th turn, cached | 6th turn, cold | cached / short | "
        "sessions TTFT p50 | p95 | sessions tokens/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        cold = _ms(r["cold"]) if "cold" in r else "-"
        print(
            f"| {label} | {_ms(r['short'])} | {_ms(r['sixth'])} | {cold} | {r['sixth'] / r['short']:.2f}x "
            f"| {_ms(r['p50'])} | {_ms(r['p95'])} | {r['tokens_per_s']:.1f} |"
        )
    ours, llama = results["adapterserve"], results["llama.cpp Q4_1"]
    today = results["adapterserve, no prefix cache"]
    print(
        f"\nshort chat TTFT vs llama.cpp: {ours['short'] / llama['short']:.2f}x; cached 6th turn vs "
        f"short chat: {ours['sixth'] / ours['short']:.2f}x; sessions tokens/s vs no prefix cache: "
        f"{ours['tokens_per_s'] / today['tokens_per_s']:.2f}x"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "llama-chat-worker":
        llama_chat_worker(*sys.argv[2:])
    else:
        main()
