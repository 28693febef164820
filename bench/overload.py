"""Overload test: the server's saturation throughput, then Poisson arrivals at twice that rate.

    python -m bench.overload [--factor 2] [--requests 400] [--max-seconds 60] [--rounds 2]

Starts ``adapterserve serve`` on loopback with a small queue and a temporary store of rank-16
all-linear adapters. Phase 1 measures saturation: a closed loop of ``--concurrency`` clients
sending mixed requests (classification, and generation of ``--new-tokens`` tokens) to random
adapters, answers counted over its second half. Phase 2 sends ``--requests`` requests (at most
``--max-seconds``) in an open loop at ``--factor`` times that rate, ``--rounds`` times. It prints
per round the answers by status, the latency percentiles of the admitted requests and the
server's resident memory (stable memory: the rounds end at about the same RSS, whatever the first
peak was); the exit status is 1 when any answer was a 5xx other than 503, or a 503 came without
Retry-After.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import PROMPT, TEXT, pct
from bench.load import make_store
from bench.server import rss_bytes, running_server


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # admitted (200) requests
    done_at: list[float] = field(default_factory=list)  # when each admitted request was answered
    missing_retry_after: int = 0
    errors: list[str] = field(default_factory=list)  # 5xx other than 503, transport errors

    @property
    def ok(self) -> int:
        return self.statuses[200]


async def _one(
    http: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, tally: Tally
) -> float | None:
    """One request, counted in ``tally``; a 503's Retry-After in seconds (None otherwise)."""
    k = rng.randrange(args.adapters)
    if rng.random() < 0.5:
        path, body = "/classify", {"adapter": f"cla-a{k}", "inputs": [TEXT]}
    else:
        path = "/generate"
        body = {"adapter": f"gen-a{k}", "prompt": PROMPT, "max_new_tokens": args.new_tokens}
    start = time.perf_counter()
    try:
        resp = await http.post(path, json=body)
    except httpx.HTTPError as exc:
        tally.errors.append(f"{path}: {exc!r}")
        return None
    tally.statuses[resp.status_code] += 1
    if resp.status_code == 200:
        tally.done_at.append(time.perf_counter())
        tally.latencies.append(tally.done_at[-1] - start)
    elif resp.status_code == 503:
        tally.missing_retry_after += "retry-after" not in resp.headers
        return float(resp.headers.get("retry-after", 1))
    elif resp.status_code >= 500:
        tally.errors.append(f"{path}: {resp.status_code} {resp.text[:200]}")
    return None


async def saturation(url: str, args: argparse.Namespace) -> float:
    """Answered requests per second with ``concurrency`` clients always waiting on an answer, counted
    over the second half of the run (the first half fills the batches and loads the adapters)."""
    tally = Tally()
    rng = random.Random(1)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        start = time.perf_counter()
        half, stop = start + args.saturation_seconds / 2, start + args.saturation_seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                # a client turned away waits as told (at most a second): a loop of instant retries
                # would measure how fast the server says 503, its GIL taken from the engine
                wait = await _one(http, rng, args, tally)
                if wait is not None:
                    await asyncio.sleep(min(wait, 1.0))

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        end = time.perf_counter()
        counted = [t for t in tally.done_at if half <= t <= stop]
        if counted:
            return len(counted) / (stop - half)
        # slow requests (long generations on a slow machine) may all end outside the window
        if not tally.done_at:
            raise RuntimeError("no request was answered while measuring the saturation rate")
        return len(tally.done_at) / (end - start)


async def open_loop(url: str, rate: float, args: argparse.Namespace) -> tuple[Tally, float]:
    tally = Tally()
    rng = random.Random(2)
    tasks: list[asyncio.Task[float | None]] = []
    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)
    ) as http:
        start = time.perf_counter()
        while len(tasks) < args.requests and time.perf_counter() - start < args.max_seconds:
            tasks.append(asyncio.create_task(_one(http, rng, args, tally)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        return tally, time.perf_counter() - start


@dataclass
class Report:
    saturation: float
    rate: float
    rounds: list[tuple[Tally, float]]  # each open-loop round: answers, seconds
    rss: list[int]  # server RSS when warm (after the saturation phase), then after each round

    @property
    def tally(self) -> Tally:
        """All rounds together."""
        total = Tally()
        for t, _ in self.rounds:
            total.statuses.update(t.statuses)
            total.latencies += t.latencies
            total.missing_retry_after += t.missing_retry_after
            total.errors += t.errors
        return total

    def failed(self) -> bool:
        return bool(self.tally.errors) or self.tally.missing_retry_after > 0

    def print(self) -> None:
        mib = 1 << 20
        print(f"\nsaturation (closed loop): {self.saturation:.2f} req/s")
        print(f"offered (open loop, Poisson): {self.rate:.2f} req/s")
        print(
            "\n| round | sent | 200 | 503 (all with Retry-After) | other | goodput req/s "
            "| p50 s | p95 s | p99 s | server RSS after |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for i, (t, secs) in enumerate(self.rounds):
            other = sum(n for s, n in t.statuses.items() if s not in (200, 503)) + len(t.errors)
            ok503 = "yes" if not t.missing_retry_after else f"no ({t.missing_retry_after} without)"
            lat, sent = t.latencies, sum(t.statuses.values()) + len(t.errors)
            print(
                f"| {i + 1} | {sent} | {t.ok} | {t.statuses[503]} ({ok503}) "
                f"| {other} | {t.ok / secs:.2f} | {pct(lat, 0.5):.2f} | {pct(lat, 0.95):.2f} "
                f"| {pct(lat, 0.99):.2f} | {self.rss[i + 1] / mib:.0f} MiB |"
            )
        print(f"\nserver RSS when warm, before the open loop: {self.rss[0] / mib:.0f} MiB")
        for e in self.tally.errors[:5]:
            print("error:", e)


def run(args: argparse.Namespace, store: Path | None = None) -> Report:
    made = store is None
    store = store or make_store(args.adapters, args.rank)
    try:
        return _run(args, store)
    finally:
        if made:
            shutil.rmtree(store.parent, ignore_errors=True)


def _run(args: argparse.Namespace, store: Path) -> Report:
    with running_server(store, max_queue=str(args.max_queue), device=args.device) as (proc, url):
        sat = asyncio.run(saturation(url, args))
        rss = [rss_bytes(proc.pid)]
        rounds = []
        for _ in range(args.rounds):
            rounds.append(asyncio.run(open_loop(url, args.factor * sat, args)))
            time.sleep(1.0)  # the last answers' buffers are released
            rss.append(rss_bytes(proc.pid))
    return Report(sat, args.factor * sat, rounds, rss)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of saturation")
    p.add_argument("--requests", type=int, default=400, help="requests per open-loop round at most")
    p.add_argument("--max-seconds", type=float, default=60.0, help="seconds of arrivals per round at most")
    p.add_argument("--rounds", type=int, default=2, help="open-loop rounds (memory is compared across them)")
    p.add_argument("--saturation-seconds", type=float, default=20.0, help="closed loop (second half counted)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients measuring saturation")
    p.add_argument("--adapters", type=int, default=4, help="adapters per task")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16, help="the server's MAX_QUEUE")
    p.add_argument("--device", default="auto")
    return p


def main() -> None:
    args = parser().parse_args()
    report = run(args)
    report.print()
    raise SystemExit(1 if report.failed() else 0)


if __name__ == "__main__":
    main()
