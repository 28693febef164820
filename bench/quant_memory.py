"""Memory of a server at each base quantization with 16 adapters loaded: the base's weight bytes
(``adapterserve_base_weight_bytes``) and the process's resident memory, after start, after loading
16 rank-16 all-linear LoRA adapters into device slots, the most during 16 concurrent generations over
them (sampled every 50 ms), and a second after they finished (the engine idle).

    python -m bench.quant_memory [--adapters 16] [--rank 16] [--kinds none,bf16,int8,int4,w8a8]

One server process per setting, one after the other, on the same store.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.config import Settings
from app.models.base_lm import load_base_model
from bench.common import PROMPT, machine_line, make_peft, save_adapters
from bench.server import rss_bytes, running_server

KINDS = "none,bf16,int8,int4,w8a8"


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"no metric {name}")


async def _generate(url: str, names: list[str], tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        bodies = [{"adapter": n, "prompt": PROMPT, "max_new_tokens": tokens} for n in names]
        for resp in await asyncio.gather(*(http.post("/generate", json=b) for b in bodies)):
            resp.raise_for_status()


def _sample(pid: int, done: threading.Event, into: list[int]) -> None:
    while not done.wait(0.05):
        into.append(rss_bytes(pid))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--kinds", default=KINDS, help="the quantization settings, in order")
    args = parser.parse_args()
    base = load_base_model("", Settings().cache_dir, "cpu", "float32")
    out = Path(tempfile.mkdtemp(prefix="adapterserve-quant-memory-"))
    rows = []
    try:
        peft = make_peft(base.path, "generate", args.adapters, args.rank, base.dtype, base.device)
        folders = save_adapters(peft, out / "a", args.adapters)
        del peft, base
        store = folders[0].parent
        names = [f.name for f in folders]
        for kind in args.kinds.split(","):
            log = out / f"server-{kind}.log"
            with running_server(store, log, quantization=kind, max_device_adapters="32") as (proc, url):
                started = rss_bytes(proc.pid)
                weights = _metric(url, "adapterserve_base_weight_bytes")
                for name in names:  # one token each: every adapter into a device slot (32 slots)
                    body = {"adapter": name, "prompt": "Hi", "max_new_tokens": 1}
                    httpx.post(f"{url}/generate", json=body, timeout=120).raise_for_status()
                loaded = rss_bytes(proc.pid)
                samples = [loaded]
                done = threading.Event()
                sampler = threading.Thread(target=_sample, args=(proc.pid, done, samples))
                sampler.start()
                try:
                    asyncio.run(_generate(url, names, args.tokens))
                finally:
                    done.set()
                    sampler.join()
                time.sleep(1.0)  # the engine goes idle
                rows.append((kind, weights, started, loaded, max(samples), rss_bytes(proc.pid)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    mib = 1024 * 1024
    print(machine_line())
    print(f"{args.adapters} LoRA adapters, rank {args.rank}, all linear layers; resident memory (VmRSS)\n")
    print(
        "| quantization | base weights | after start | with the adapters loaded "
        f"| most during {args.adapters} concurrent generations | a second after them |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind, weights, started, loaded, peak, after in rows:
        print(
            f"| {kind} | {weights / mib:.0f} MiB | {started / mib:.0f} MiB | {loaded / mib:.0f} MiB "
            f"| {peak / mib:.0f} MiB | {after / mib:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
