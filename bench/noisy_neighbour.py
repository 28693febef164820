"""Noisy neighbour: a quiet app's latency while another app floods the service, per scheduler.

    python -m bench.noisy_neighbour [--flood-clients 48] [--flood-tokens 96] [--window 90]
                                    [--rounds 1] [--schedulers fifo,fair] [--dtype auto]
                                    [--quantization auto]

Two tenants on one server (a tenants file, no limits): ``flood`` runs ``--flood-clients`` clients
sending ``--flood-tokens``-token generations back to back (min_tokens = max_new_tokens: every one
generates all of them) with its adapter; ``quiet`` sends, one at a time, a 16-token generation with
its own adapter and a one-text classification: alone one after the other, and during the flood at
its own pace (one of each every ``--every`` seconds, whether the last was answered or not), so that
every scheduler serves the same work in the window. For each scheduler (``ADAPTERSERVE_SCHEDULER``,
in turns, ``--rounds`` times): the quiet requests alone, then during ``--window`` seconds of the
flood (after a warm-up that fills the batch). Printed: the quiet tenant's median latencies alone and
in the flood, their ratio, its errors, and the total generated tokens per second during the window
(every tenant's; from the server's batch-size histograms), with the ratio to first come, first
served measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import PROMPT, TEXT, machine_line
from bench.load import make_store
from bench.server import running_server

FLOOD_KEY, QUIET_KEY = "flood-key", "quiet-key"
QUIET_TOKENS = 16


def tenants_file(folder: Path) -> Path:
    from app.tenants import key_hash

    path = folder / "tenants.yaml"
    path.write_text(
        "tenants:\n"
        f"  flood:\n    keys: [{key_hash(FLOOD_KEY)}]\n    adapters: [gen-a0]\n"
        f"  quiet:\n    keys: [{key_hash(QUIET_KEY)}]\n    adapters: [gen-a1, cla-a0]\n"
    )
    return path


@dataclass
class Quiet:
    gen: list[float] = field(default_factory=list)
    cls: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _one(
    http: httpx.AsyncClient, path: str, body: dict[str, object], into: list[float], out: Quiet
) -> None:
    start = time.perf_counter()
    try:
        resp = await http.post(path, json=body)
    except httpx.HTTPError as exc:
        out.errors.append(f"{path}: {exc!r}")
        return
    if resp.status_code == 200:
        into.append(time.perf_counter() - start)
    else:
        out.errors.append(f"{path}: {resp.status_code} {resp.text[:200]}")


QUIET_GEN: dict[str, object] = {"adapter": "gen-a1", "prompt": PROMPT, "max_new_tokens": QUIET_TOKENS}
QUIET_CLS: dict[str, object] = {"adapter": "cla-a0", "inputs": [TEXT]}


async def quiet_alone(url: str, n: int, pause: float) -> Quiet:
    """``n`` rounds of (a generation, a classification), one request at a time."""
    out = Quiet()
    headers = {"Authorization": f"Bearer {QUIET_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as http:
        for _ in range(n):
            await _one(http, "/generate", QUIET_GEN, out.gen, out)
            await asyncio.sleep(pause)
            await _one(http, "/classify", QUIET_CLS, out.cls, out)
            await asyncio.sleep(pause)
    return out


async def quiet_every(url: str, every: float, until: float) -> Quiet:
    """A generation and, half a period later, a classification every ``every`` seconds until
    ``until`` (an app's own pace: each is sent on time, whether the last was answered or not)."""
    out = Quiet()
    headers = {"Authorization": f"Bearer {QUIET_KEY}"}
    sent: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as http:
        while time.perf_counter() < until:
            sent.append(asyncio.create_task(_one(http, "/generate", QUIET_GEN, out.gen, out)))
            await asyncio.sleep(every / 2)
            sent.append(asyncio.create_task(_one(http, "/classify", QUIET_CLS, out.cls, out)))
            await asyncio.sleep(every / 2)
        await asyncio.gather(*sent)
    return out


async def generated_tokens(http: httpx.AsyncClient) -> float:
    """Tokens generated so far: a row of each decode step and each prefilled row's first token
    (the sums of the server's batch-size histograms; exact at any moment, unlike the per-request
    counters, which count a generation when it ends)."""
    text = (await http.get("/metrics")).text
    return sum(
        float(m.group(1))
        for m in re.finditer(
            r'^adapterserve_batch_size_sum\{task="(?:generate|prefill)"\} (\S+)$', text, re.M
        )
    )


async def flood_phase(url: str, args: argparse.Namespace) -> tuple[Quiet, float, int]:
    """The quiet requests during ``--window`` seconds of the flood (the same ones for every
    scheduler); the total tokens/s over that window (until the last quiet answer); flood errors."""
    stop = asyncio.Event()
    flood_errors = 0
    body = {
        "adapter": "gen-a0",
        "prompt": PROMPT,
        "max_new_tokens": args.flood_tokens,
        "min_tokens": args.flood_tokens,
    }

    async def client(http: httpx.AsyncClient, start_after: float) -> None:
        nonlocal flood_errors
        await asyncio.sleep(start_after)
        while not stop.is_set():
            try:
                resp = await http.post("/generate", json=body)
                flood_errors += resp.status_code != 200
            except httpx.HTTPError:
                flood_errors += 1

    headers = {"Authorization": f"Bearer {FLOOD_KEY}"}
    limits = httpx.Limits(max_connections=args.flood_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as http:
        # the clients start spread over the first seconds, as independent clients do: their
        # generations do not all begin and end in the same step
        rng = random.Random(0)
        clients = [
            asyncio.create_task(client(http, rng.uniform(0, args.warmup / 2)))
            for _ in range(args.flood_clients)
        ]
        await asyncio.sleep(args.warmup)
        t0, tok0 = time.perf_counter(), await generated_tokens(http)
        quiet = await quiet_every(url, args.every, until=t0 + args.window)
        t1, tok1 = time.perf_counter(), await generated_tokens(http)
        stop.set()
        await asyncio.gather(*clients)
    return quiet, (tok1 - tok0) / (t1 - t0), flood_errors


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


FORMAT: dict[str, str] = {}  # the base's format the server reports (ADAPTERSERVE_QUANTIZATION resolved)


async def one_server(url: str, args: argparse.Namespace) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url) as http:
        FORMAT["quantization"] = (await http.get("/readyz")).json()["quantization"]
    await quiet_alone(url, 2, 0.0)  # warm: adapters loaded, first forwards done
    alone = await quiet_alone(url, args.quiet_requests, args.pause)
    flood, tokens_per_s, flood_errors = await flood_phase(url, args)
    return {
        "gen_alone": median_ms(alone.gen),
        "gen_flood": median_ms(flood.gen),
        "cls_alone": median_ms(alone.cls),
        "cls_flood": median_ms(flood.cls),
        "quiet_errors": len(alone.errors) + len(flood.errors),
        "flood_errors": flood_errors,
        "tokens_per_s": tokens_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood-clients", type=int, default=48)
    parser.add_argument("--flood-tokens", type=int, default=96)
    parser.add_argument("--quiet-requests", type=int, default=8, help="of each kind, alone")
    parser.add_argument("--window", type=float, default=90.0, help="of the flood, measured (s)")
    parser.add_argument("--dtype", default="auto", help="ADAPTERSERVE_DTYPE of the server")
    parser.add_argument("--quantization", default="auto", help="ADAPTERSERVE_QUANTIZATION of the server")
    parser.add_argument("--pause", type=float, default=0.2, help="between the quiet requests alone (s)")
    parser.add_argument("--every", type=float, default=3.0, help="the quiet app's period in the flood (s)")
    parser.add_argument("--warmup", type=float, default=10.0, help="flood before the quiet requests (s)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--schedulers", default="fifo,fair")
    args = parser.parse_args()
    store = make_store(2, 16)
    folder = Path(tempfile.mkdtemp(prefix="adapterserve-noisy-"))
    tenants = tenants_file(folder)
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    try:
        for _ in range(args.rounds):
            for scheduler in args.schedulers.split(","):
                log = folder / f"{scheduler}.log"
                settings = {
                    "tenants_file": str(tenants),
                    "scheduler": scheduler,
                    "dtype": args.dtype,
                    "quantization": args.quantization,
                }
                with running_server(store, log, **settings) as (_, url):
                    results[scheduler].append(asyncio.run(one_server(url, args)))
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(machine_line())
    print(
        f"dtype {args.dtype}, quantization {args.quantization} ({FORMAT.get('quantization')}); "
        f"flood: {args.flood_clients} clients × "
        f"{args.flood_tokens}-token generations; quiet: a {QUIET_TOKENS}-token generation and a "
        "one-text classification "
        f"({args.quiet_requests} of each alone, one after the other; in the flood, one of each every "
        f"{args.every:g} s for {args.window:g} s); medians; {args.rounds} round(s)\n"
    )
    print(
        "| scheduler | quiet gen alone | in flood | ratio | quiet classify alone | in flood | ratio "
        "| quiet errors | flood errors | total tokens/s | vs fifo |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for scheduler, runs in results.items():
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        errors = sum(r["quiet_errors"] for r in runs), sum(r["flood_errors"] for r in runs)
        base = base or (row["tokens_per_s"] if scheduler == "fifo" else None)
        versus = f"{row['tokens_per_s'] / base:.3f}" if base else "-"
        print(
            f"| {scheduler} | {row['gen_alone']:.0f} ms | {row['gen_flood']:.0f} ms "
            f"| {row['gen_flood'] / row['gen_alone']:.2f}x | {row['cls_alone']:.0f} ms "
            f"| {row['cls_flood']:.0f} ms | {row['cls_flood'] / row['cls_alone']:.2f}x | {errors[0]} "
            f"| {errors[1]} | {row['tokens_per_s']:.0f} | {versus} |"
        )


if __name__ == "__main__":
    main()
