"""Memory of a server at each base quantization with 16 adapters loaded: the base's weight bytes
(``adapterserve_base_weight_bytes``) and the process's resident memory, after start, after loading
16 rank-16 all-linear LoRA adapters into device slots, the most during 16 concurrent generations over
them (sampled every 50 ms), and a second after they finished (the engine idle); beside llama.cpp's
own server on the packaged Q4_1 weights with the same adapters (converted by its
``convert_lora_to_gguf.py``, all loaded at its start, 16 parallel slots), measured the same way.

    python -m bench.quant_memory [--adapters 16] [--rank 16] [--kinds none,bf16,int8,int4,w8a8]
                                 [--no-llama-cpp]

One server process per setting, one after the other, on the same store.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

import httpx

from app.config import Settings
from app.models.base_lm import load_base_model
from app.models.sources import DEFAULT_BASE, packaged_path
from bench.common import PROMPT, machine_line, make_peft, save_adapters
from bench.llamacpp import llama_cpp_scripts, llama_round, llama_server, lora_gguf
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


def _under_load(pid: int, load: Callable[[], Coroutine[None, None, object]]) -> tuple[int, int]:
    """The most resident memory of ``pid`` while ``load`` runs, and a second after it."""
    samples = [rss_bytes(pid)]
    done = threading.Event()
    sampler = threading.Thread(target=_sample, args=(pid, done, samples))
    sampler.start()
    try:
        asyncio.run(load())
    finally:
        done.set()
        sampler.join()
    time.sleep(1.0)  # the engine goes idle
    return max(samples), rss_bytes(pid)


Row = tuple[str, float, int, int, int, int]  # system, weights, started, loaded, peak, after


def _llama_cpp(base: Path, folders: list[Path], tokens: int, work: Path) -> Row:
    cache = Settings().cache_dir
    scripts = llama_cpp_scripts(cache)
    loras = [lora_gguf(scripts, base, f, work / f"{f.name}.gguf") for f in folders]
    q4 = packaged_path(DEFAULT_BASE, cache)
    with llama_server(q4, loras, len(loras), work / "llama.log") as (pid, url):
        loaded = rss_bytes(pid)  # its adapters are loaded at start
        peak, after = _under_load(pid, llama_round(url, len(loras), tokens, True))
    return "llama.cpp Q4_1", q4.stat().st_size, loaded, loaded, peak, after


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--kinds", default=KINDS, help="the quantization settings, in order")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp's server out")
    args = parser.parse_args()
    base = load_base_model("", Settings().cache_dir, "cpu", "float32")
    base_path = base.path
    out = Path(tempfile.mkdtemp(prefix="adapterserve-quant-memory-"))
    rows: list[Row] = []
    try:
        peft = make_peft(base.path, "generate", args.adapters, args.rank, base.dtype, base.device)
        folders = save_adapters(peft, out / "a", args.adapters)
        del peft, base
        store = folders[0].parent
        names = [f.name for f in folders]
        if not args.no_llama_cpp:
            rows.append(_llama_cpp(base_path, folders, args.tokens, out))
        for kind in args.kinds.split(","):
            log = out / f"server-{kind}.log"
            with running_server(store, log, quantization=kind, max_device_adapters="32") as (proc, url):
                started = rss_bytes(proc.pid)
                weights = _metric(url, "adapterserve_base_weight_bytes")
                for name in names:  # one token each: every adapter into a device slot (32 slots)
                    body = {"adapter": name, "prompt": "Hi", "max_new_tokens": 1}
                    httpx.post(f"{url}/generate", json=body, timeout=120).raise_for_status()
                loaded = rss_bytes(proc.pid)
                peak, after = _under_load(proc.pid, lambda: _generate(url, names, args.tokens))
                rows.append((f"adapterserve {kind}", weights, started, loaded, peak, after))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    _report(rows, args.adapters, args.rank)


def _report(rows: list[Row], adapters: int, rank: int) -> None:
    mib = 1024 * 1024
    print(machine_line())
    print(f"{adapters} LoRA adapters, rank {rank}, all linear layers; resident memory (VmRSS)\n")
    anchor = rows[0] if rows and rows[0][0].startswith("llama.cpp") else None
    print(
        "| system | base weights | after start | with the adapters loaded "
        f"| most during {adapters} concurrent generations | a second after them "
        "| vs llama.cpp (loaded / after) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, weights, started, loaded, peak, after in rows:
        ratio = f"{loaded / anchor[3]:.2f}x / {after / anchor[5]:.2f}x" if anchor else "-"
        print(
            f"| {name} | {weights / mib:.0f} MiB | {started / mib:.0f} MiB | {loaded / mib:.0f} MiB "
            f"| {peak / mib:.0f} MiB | {after / mib:.0f} MiB | {ratio} |"
        )


if __name__ == "__main__":
    main()
