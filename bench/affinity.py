"""Adapter-affinity routing measured: nginx (deploy/nginx/adapterserve.conf) in front of three
replicas on one store, a Zipf workload over many adapters with small device tiers, affinity
(consistent hash on ``X-Adapter``) against round robin, in turns of one run.

    python -m bench.affinity [--adapters 60] [--requests 600] [--device-slots 6] [--clients 6]

Prints one markdown table: per routing, the device hit ratio (requests whose adapter was already in
a device slot of the replica that served it), cold device loads per request, host loads per
request, and the request rate. Each routing serves its own set of adapter names (the same
weights, different names), so each starts cold.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.server import free_port, running_servers

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx" / "adapterserve.conf"
TOKEN = "bench-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TEXT = "The new phone has a great screen but the battery barely lasts a day."


def nginx_conf(ports: list[int], listen: int, affinity: bool) -> str:
    """The shipped configuration with these replicas, this port, and hashing on or off."""
    text = NGINX_CONF.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;\n" for p in ports)
    text = re.sub(r"(        server 127\.0\.0\.1:\d+ [^\n]*\n)+", servers, text)
    text = text.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen};")
    if not affinity:
        text = re.sub(r"        hash \$adapter_key consistent;[^\n]*\n", "", text)
    return text


@contextmanager
def nginx(ports: list[int], affinity: bool, folder: Path) -> Iterator[str]:
    """nginx (Debian's package) in front of ``ports``; yields its URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    folder.mkdir(parents=True, exist_ok=True)
    listen = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(nginx_conf(ports, listen, affinity))
    proc = subprocess.Popen(
        [binary, "-p", str(folder), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Fleet:
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]

    @property
    def ports(self) -> list[int]:
        return [int(u.rsplit(":", 1)[1]) for u in self.urls]


@contextmanager
def fleet(
    store: Path, logs: Path, device_slots: int, replicas: int = 3, base: Path | None = None
) -> Iterator[Fleet]:
    """``replicas`` servers on one store folder (``base``: another base model than the default)."""
    settings = {
        "admin_token": TOKEN,
        "device": "cpu",
        "max_device_adapters": str(device_slots),
        "store_sync_interval_s": "0.5",
        **({"base_model": str(base)} if base is not None else {}),
    }
    with running_servers(replicas, store, logs, **settings) as started:
        yield Fleet([u for _, u in started], [p for p, _ in started])


def upload_copies(url: str, archive: bytes, names: list[str]) -> None:
    with httpx.Client(timeout=120) as http:
        for name in names:
            files = {"file": ("a.zip", archive, "application/zip")}
            resp = http.post(f"{url}/admin/adapters", headers=ADMIN, data={"name": name}, files=files)
            resp.raise_for_status()


def zipf_names(names: list[str], count: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(len(names))]
    return rng.choices(names, weights, k=count)


def device_loads(urls: list[str]) -> tuple[float, float]:
    """(device loads, host loads) summed over the replicas that answer."""
    device = host = 0.0
    for url in urls:
        try:
            text = httpx.get(f"{url}/metrics", timeout=5).text
        except httpx.TransportError:
            continue
        for line in text.splitlines():
            if line.startswith('adapterserve_adapter_loads_total{tier="device"}'):
                device += float(line.split()[-1])
            elif line.startswith('adapterserve_adapter_loads_total{tier="host"}'):
                host += float(line.split()[-1])
    return device, host


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    seconds: float = 0.0
    device_loads: float = 0.0
    host_loads: float = 0.0


def run_workload(
    lb: str,
    sequence: list[str],
    clients: int,
    replicas: list[str],
    on_progress: tuple[int, threading.Event] | None = None,
) -> Outcome:
    """Send ``sequence`` (one adapter name per request) through ``lb`` from ``clients`` threads."""
    out = Outcome()
    lock = threading.Lock()
    todo = iter(enumerate(sequence))
    before = device_loads(replicas)

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                i, name = item
                if on_progress is not None and i == on_progress[0]:
                    on_progress[1].set()
                body = {"adapter": name, "inputs": [TEXT]}
                try:
                    status = http.post(f"{lb}/classify", json=body, headers={"X-Adapter": name}).status_code
                except httpx.TransportError:
                    status = 0
                with lock:
                    out.statuses.append(status)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.seconds = time.perf_counter() - start
    after = device_loads(replicas)
    out.device_loads, out.host_loads = after[0] - before[0], after[1] - before[1]
    return out


def make_archive(folder: Path, base: Path | None = None) -> bytes:
    """A small classification adapter (PEFT LoRA on q/v, rank 4) of the default base (or
    ``base``), zipped."""
    import io
    import zipfile

    import torch

    from app.config import Settings
    from app.models.base_lm import resolve_model_path
    from bench.common import make_peft, save_adapters

    path = base or resolve_model_path(Settings().base_model, Settings().cache_dir)[0]
    peft = make_peft(path, "classify", 1, 4, torch.float32, torch.device("cpu"), 3, ["q_proj", "v_proj"])
    (adapter,) = save_adapters(peft, folder, 1, ["negative", "neutral", "positive"])
    del peft
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in adapter.iterdir():
            zf.write(f, f.name)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=60)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--device-slots", type=int, default=6, help="MAX_DEVICE_ADAPTERS of each replica")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterserve-affinity-"))
    try:
        archive = make_archive(work / "adapter")
        rows = []
        with fleet(work / "store", work, args.device_slots) as f:
            for affinity in (True, False):
                tag = "aff" if affinity else "rr"
                names = [f"{tag}-{i}" for i in range(args.adapters)]
                upload_copies(f.urls[0], archive, names)
                time.sleep(1.5)  # every replica has synced
                sequence = zipf_names(names, args.requests, args.zipf, seed=1)
                with nginx(f.ports, affinity, work / f"nginx-{tag}") as lb:
                    out = run_workload(lb, sequence, args.clients, f.urls)
                ok = sum(s == 200 for s in out.statuses)
                rows.append(
                    (
                        "consistent hash on X-Adapter" if affinity else "round robin",
                        1 - out.device_loads / len(sequence),
                        out.device_loads / len(sequence),
                        out.host_loads / len(sequence),
                        ok / out.seconds,
                        ok,
                    )
                )
        print(
            f"\n{args.adapters} adapters, Zipf s={args.zipf}, {args.requests} requests from {args.clients} "
            f"clients, 3 replicas with {args.device_slots} device slots each\n"
        )
        print(
            "| routing | device hit ratio | cold device loads / request | host loads / request "
            "| requests/s | 200s |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, hit, cold, host, rate, ok in rows:
            print(f"| {name} | {hit:.2f} | {cold:.3f} | {host:.3f} | {rate:.1f} | {ok} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
