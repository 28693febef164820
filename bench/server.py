"""``adapterserve serve`` as its own process on a free loopback port (benchmarks and system tests)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def _worker() -> tuple[int, int]:
    """This process's index among the test workers running side by side, and their count
    (pytest-xdist's ``PYTEST_XDIST_WORKER`` ``gwN`` and ``PYTEST_XDIST_WORKER_COUNT``; else 0, 1)."""
    name, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if name.startswith("gw") and name[2:].isdigit() and count.isdigit() and int(count) > 1:
        return int(name[2:]) % int(count), int(count)
    return 0, 1


def free_port() -> int:
    """A loopback port free now. The caller's server binds it later: where several processes pick
    ports side by side (test workers), each takes ports of its own residue, so two of them never
    hand the same released port to their servers (one server would answer the other's clients)."""
    index, count = _worker()
    while True:
        # (the kernel's own choice, bind to port 0, comes from a fixed half of the range: odd ports)
        want = 0 if count == 1 else random.randrange(20000 + index, 60000, count)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", want))
            except OSError:
                continue  # taken: another one
            return int(s.getsockname()[1])


def start_server(
    store: Path | str, log: Path | None = None, **settings: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server on ``store`` (``settings``: ADAPTERSERVE_* values by field name); return the
    process and its URL at once (:func:`wait_ready` waits for it)."""
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
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path | None = None, timeout: float = 120
) -> None:
    """Until ``/readyz`` answers 200; raises when the process exits or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None else ""
            raise RuntimeError(f"the server exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not become ready within {timeout:.0f} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


@contextmanager
def running_server(
    store: Path | str, log: Path | None = None, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start the server on ``store`` (``settings``: ADAPTERSERVE_* values by field name) and yield
    the process and its URL once /readyz answers 200; the process is killed on exit if still alive."""
    proc, url = start_server(store, log, **settings)
    try:
        wait_ready(proc, url, log)
        yield proc, url
    finally:
        _stop(proc)


@contextmanager
def running_servers(
    count: int, store: Path | str, logs: Path | None = None, **settings: str
) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """``count`` servers on one store, started together (``logs``: a folder for replica-N.log);
    yielded once every one is ready, killed on exit."""
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i in range(count):
            log = logs / f"replica-{i}.log" if logs is not None else None
            started.append(start_server(store, log, **settings))
        for i, (proc, url) in enumerate(started):
            wait_ready(proc, url, logs / f"replica-{i}.log" if logs is not None else None)
        yield started
    finally:
        for proc, _ in started:
            _stop(proc)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
