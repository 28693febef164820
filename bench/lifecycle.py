"""Adapter lifecycle benchmarks: cold loads, many adapters under Zipf popularity, churn under traffic.

    python -m bench.lifecycle [--adapters 500] [--requests 800] [--churn 100]

1. Cold load store -> device (read + validate into host memory, then copy into a device slot) of
   all-linear LoRA adapters of rank 8, 16 and 64, from a warm page cache: p50/p99.
2. ``--adapters`` distinct classification adapters in the store, requests drawn from a Zipf
   distribution (s=1.1) by 16 concurrent clients through the HTTP app, with 32 device slots and a
   host tier of a quarter of the adapters; side by side with the same requests when every adapter
   fits. Prints throughput, p50/p99 latency and each tier's hit ratio.
3. ``--churn`` uploads and deletes interleaved with that traffic: every request must succeed.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.adapters.catalog import AdapterCatalog
from app.adapters.store import folder_store
from app.config import Settings
from app.engine.slots import DeviceSlots
from app.main import create_app
from app.models.base_lm import BaseLM, load_base_model
from app.models.multi_lora import RoutingContext, wrap_linear_layers
from app.platform import keep_freed_memory
from bench.common import make_peft, pct, save_adapters

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
TOKEN = "bench-admin-token"
TEXT = "Shares of the carmaker rose sharply after it reported record quarterly profits."


def _template(base: BaseLM, tmp: Path, task: str, rank: int) -> Path:
    peft = make_peft(base.path, task, 1, rank, torch.float32, torch.device("cpu"))
    folders = save_adapters(peft, tmp / f"{task}-r{rank}", 1, LABELS if task == "classify" else None)
    return folders[0]


def _variants(template: Path, out: Path, names: list[str]) -> None:
    """Store-ready PEFT folders with the template's config and fresh random weights each."""
    tensors = load_file(str(template / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name in names:
        folder = out / name
        folder.mkdir(parents=True)
        for f in template.iterdir():
            if f.name != "adapter_model.safetensors":
                shutil.copy(f, folder / f.name)
        fresh = {
            k: torch.randn(v.shape, generator=gen) * (0.01 if "lora_B" in k else 0.05)
            for k, v in tensors.items()
        }
        save_file(fresh, str(folder / "adapter_model.safetensors"))


# --- 1. cold loads ----------------------------------------------------------------------------
def cold_loads(base: BaseLM, tmp: Path, repeats: int) -> None:
    """Two regimes: a fresh process whose host tier keeps every adapter read, and the steady state
    of a server with more adapters than its host tier holds (the LRU evicts one adapter per load).
    The slowest load of each row includes growing the slot banks for the first adapter of a rank."""
    ctx = RoutingContext()
    slots = DeviceSlots(wrap_linear_layers(base.model, ctx), 4, base.device, base.dtype)
    print(
        "\n| adapter | size MB | host tier | store -> host p50 / p99 ms | host -> device p50 / p99 ms "
        "| total p50 / p99 ms |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for rank in (8, 16, 64):
        store = tmp / f"cold-r{rank}"
        _variants(_template(base, tmp, "generate", rank), store, [f"r{rank}-{i}" for i in range(repeats)])
        size = sum(f.stat().st_size for f in (store / f"r{rank}-0").iterdir())
        for regime, budget in (("keeps all (fresh memory)", None), ("holds 4, LRU (steady state)", 4 * size)):
            catalog = AdapterCatalog.detached(folder_store(store), base.spec, budget or 1 << 62)
            catalog.scan()
            names = [record.name for record in catalog.adapters()]
            if budget is not None:  # the steady state: the tier is full before the measured loads
                for name in names[-4:]:
                    catalog.hold(name)
            for name in names:  # warm page cache, as for an adapter read before
                (store / name / "adapter_model.safetensors").read_bytes()
            host, device, total = [], [], []
            for name in names:
                t0 = time.perf_counter()
                held = catalog.hold(name)
                t1 = time.perf_counter()
                slots.acquire(held.record.handle, held.weights, set())
                if base.device.type == "cuda":
                    torch.cuda.synchronize(base.device)
                t2 = time.perf_counter()
                host.append((t1 - t0) * 1000)
                device.append((t2 - t1) * 1000)
                total.append((t2 - t0) * 1000)
            row = [f"{pct(v, 0.5):.1f} / {pct(v, 0.99):.1f}" for v in (host, device, total)]
            print(f"| rank {rank} all-linear | {size / 1e6:.1f} | {regime} | {' | '.join(row)} |", flush=True)
            for version in slots.lru_order():
                slots.unload(version.uid)
            slots.compact()
            del catalog, held


# --- 2. Zipf over many adapters ---------------------------------------------------------------
def _zipf(n: int, count: int, s: float = 1.1, seed: int = 0) -> list[int]:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return random.Random(seed).choices(range(n), weights=weights, k=count)


def _metric(client: TestClient, name: str, tier: str) -> float:
    prefix = f'adapterserve_{name}{{tier="{tier}"}}'
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f.name)
    return buf.getvalue()


def zipf_run(
    base: BaseLM,
    store: Path,
    n: int,
    requests: int,
    slots: int,
    host_bytes: int,
    churn: Path | None,
    ops: int,
) -> dict[str, Any]:
    settings = Settings(
        store=store,
        admin_token=TOKEN,
        max_device_adapters=slots,
        max_host_adapter_bytes=host_bytes,
        max_device_adapter_bytes=host_bytes,
        max_queue=10_000,
        request_timeout_s=600,
    )
    order = _zipf(n, requests)
    with TestClient(create_app(settings, base=base)) as client:
        for i in range(n):  # warm-up: every adapter used once, as after a while in service
            client.post("/classify", json={"adapter": f"c{i:04d}", "inputs": TEXT})
        before = {(m, t): _metric(client, m, t) for m in ("adapter_loads_total",) for t in ("host", "device")}
        latencies: list[float] = []
        failures: list[str] = []
        churn_done = threading.Event()

        def one(k: int) -> None:
            t0 = time.perf_counter()
            resp = client.post("/classify", json={"adapter": f"c{k:04d}", "inputs": f"{k}. {TEXT}"})
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                failures.append(f"{resp.status_code} {resp.text[:200]}")

        def churner() -> None:
            assert churn is not None
            archive = _zip(churn)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            for i in range(ops // 2):
                name = f"churn-{i % 4}"
                up = client.post(
                    "/admin/adapters",
                    headers=headers,
                    data={"name": name},
                    files={"file": ("a.zip", archive)},
                )
                if up.status_code != 201:
                    failures.append(f"upload {up.status_code} {up.text[:200]}")
                gen = client.post("/classify", json={"adapter": name, "inputs": TEXT})
                if gen.status_code != 200:
                    failures.append(f"churned adapter {gen.status_code} {gen.text[:200]}")
                down = client.delete(f"/admin/adapters/{name}", headers=headers)
                if down.status_code != 204:
                    failures.append(f"delete {down.status_code} {down.text[:200]}")
            churn_done.set()

        start = time.perf_counter()
        churn_thread = threading.Thread(target=churner) if churn is not None else None
        if churn_thread:
            churn_thread.start()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, order))
        elapsed = time.perf_counter() - start
        if churn_thread:
            churn_thread.join()
        device_loads = (
            _metric(client, "adapter_loads_total", "device") - before[("adapter_loads_total", "device")]
        )
        host_loads = _metric(client, "adapter_loads_total", "host") - before[("adapter_loads_total", "host")]
    device_loads -= ops // 2 if churn is not None else 0  # each churned version is used once
    return {
        "throughput": requests / elapsed,
        "p50": pct(latencies, 0.5) * 1000,
        "p99": pct(latencies, 0.99) * 1000,
        "device": 1 - device_loads / requests,  # served from a resident slot
        "host": (device_loads - host_loads) / requests,  # copied from host memory
        "store": host_loads / requests,  # read from the store first
        "failures": failures,
        "churn_ops": ops if churn is not None else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=500)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--rank", type=int, default=8, help="rank of the Zipf-run adapters (all-linear)")
    parser.add_argument("--churn", type=int, default=100, help="uploads + deletes during the constrained run")
    parser.add_argument("--cold-repeats", type=int, default=30)
    parser.add_argument("--cold-only", action="store_true", help="only the cold-load table")
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()  # as the server's engine does
    base = load_base_model("", Settings().cache_dir, "auto", "auto")
    tmp = Path(tempfile.mkdtemp(prefix="adapterserve-lifecycle-"))
    try:
        print(f"device={base.device} dtype={base.dtype} threads={torch.get_num_threads()}")
        cold_loads(base, tmp, args.cold_repeats)
        if args.cold_only:
            return
        store = tmp / "zipf-store"
        _variants(
            _template(base, tmp, "classify", args.rank), store, [f"c{i:04d}" for i in range(args.adapters)]
        )
        churn = _template(base, tmp, "classify", 4)
        size = sum(f.stat().st_size for f in (store / "c0000").iterdir())
        n = args.adapters
        runs = {
            f"32 device slots, host tier {n // 4} adapters, {args.churn} uploads/deletes meanwhile": zipf_run(
                base, store, n, args.requests, 32, size * (n // 4), churn, args.churn
            ),
            f"all {n} fit on the device": zipf_run(base, store, n, args.requests, n, size * (n + 8), None, 0),
        }
        print(
            f"\n{n} rank-{args.rank} all-linear classification adapters, {args.requests} requests, "
            "Zipf s=1.1, 16 concurrent clients"
        )
        print(
            "| configuration | requests/s | p50 ms | p99 ms | device hits | host hits | store reads "
            "| failed |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in runs.items():
            print(
                f"| {name} | {r['throughput']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['device']:.2f} | "
                f"{r['host']:.2f} | {r['store']:.2f} | {len(r['failures'])} |"
            )
        for r in runs.values():
            for failure in r["failures"][:5]:
                print("failure:", failure)
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "failures"} for k, v in runs.items()}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
