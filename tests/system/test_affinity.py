"""Adapter-affinity routing for real: nginx (Debian's package, with the shipped
deploy/nginx/adapterserve.conf) in front of three replicas on one store. Under a Zipf workload with
small device tiers, hashing on ``X-Adapter`` loads adapters onto devices less often than round
robin; a replica killed mid-run loses only the requests in flight on it. The replicas serve a tiny
random Llama (routing does not depend on the model's size; `bench/affinity.py` measures the same
on the default base)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.affinity import Fleet, fleet, make_archive, nginx, run_workload, upload_copies, zipf_names
from tests.helpers.families import tiny_base

ADAPTERS = 60
REQUESTS = 240
CLIENTS = 4
SLOTS = 6


@pytest.fixture(scope="module")
def replicas(
    base_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Fleet, bytes, Path]]:
    work = tmp_path_factory.mktemp("affinity")
    base = tiny_base("llama", base_path, work / "base")
    archive = make_archive(work / "adapter", base)
    with fleet(work / "store", work, SLOTS, base=base) as f:
        yield f, archive, work


def test_affinity_loads_adapters_less_often_than_round_robin(replicas: tuple[Fleet, bytes, Path]) -> None:
    f, archive, work = replicas
    loads: dict[bool, float] = {}
    for affinity in (True, False):
        names = [f"{'aff' if affinity else 'rr'}-{i}" for i in range(ADAPTERS)]
        upload_copies(f.urls[0], archive, names)
        time.sleep(1.5)  # every replica has synced (0.5 s interval)
        with nginx(f.ports, affinity, work / f"nginx-{affinity}") as lb:
            out = run_workload(lb, zipf_names(names, REQUESTS, 1.1, seed=3), CLIENTS, f.urls)
        assert out.statuses.count(200) == REQUESTS, out.statuses
        loads[affinity] = out.device_loads
    print(
        f"\ncold device loads, {REQUESTS} requests: affinity {loads[True]:.0f}, "
        f"round robin {loads[False]:.0f}"
    )
    assert loads[True] < loads[False]


def test_a_killed_replica_loses_only_its_requests_in_flight(replicas: tuple[Fleet, bytes, Path]) -> None:
    f, archive, work = replicas
    names = [f"k-{i}" for i in range(ADAPTERS)]
    upload_copies(f.urls[0], archive, names)
    time.sleep(1.5)
    sequence = zipf_names(names, REQUESTS, 1.1, seed=4)
    with nginx(f.ports, True, work / "nginx-kill") as lb:
        third = threading.Event()

        def kill() -> None:
            if third.wait(300):
                os.kill(f.procs[2].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill)
        killer.start()
        out = run_workload(lb, sequence, CLIENTS, f.urls[:2], (REQUESTS // 3, third))
        killer.join()
    assert f.procs[2].poll() is not None  # it was killed mid-run
    failed = [s for s in out.statuses if s != 200]
    # at most the requests in flight on the killed replica: one per client at the moment of the kill
    assert len(failed) <= CLIENTS, failed
    print(f"\nkilled one replica of three mid-run: {len(failed)} of {REQUESTS} requests failed")
