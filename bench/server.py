"""``adapterserve serve`` as its own process on a free loopback port (benchmarks and system tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    store: Path | str, log: Path | None = None, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start the server on ``store`` (``settings``: ADAPTERSERVE_* values by field name) and yield
    the process and its URL once /readyz answers 200; the process is killed on exit if still alive."""
    port = free_port()
    env = {
        **os.environ,
        "ADAPTERSERVE_STORE": str(store),
        "ADAPTERSERVE_PORT": str(port),
        "ADAPTERSERVE_LOG_LEVEL": "warning",
        **{f"ADAPTERSERVE_{k.upper()}": v for k, v in settings.items()},
    }
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = log.read_text()[-2000:] if log is not None else ""
                raise RuntimeError(f"the server exited with {proc.returncode}: {tail}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready within 120 s")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
