"""The OpenMP team hand-back that keeps the engine thread's parallel ops fast (app/platform.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from app import platform as threads


def test_torch_s_libgomp_is_found_so_teams_are_given_back() -> None:
    bundled = (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists()  # Linux wheels
    assert threads._pause() is not None or not bundled


def test_release_is_harmless_with_and_without_a_team() -> None:
    threads.release_omp_threads()  # no team yet in a fresh state is fine
    x = torch.randn(256, 256)
    expected = x @ x
    threads.release_omp_threads()  # gives the team back ...
    assert torch.equal(x @ x, expected)  # ... and the next parallel op starts a new one
    threads.release_omp_threads()


def test_releasing_gives_the_team_back_after_success_and_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[str] = []
    monkeypatch.setattr(
        threads, "release_omp_threads", lambda: released.append(threading.current_thread().name)
    )

    assert threads.releasing(lambda a, b=1: a + b)(2, b=3) == 5

    def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError):
        threads.releasing(boom)()
    assert len(released) == 2


def test_releasing_executor_runs_jobs_and_releases_in_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[str] = []
    monkeypatch.setattr(
        threads, "release_omp_threads", lambda: released.append(threading.current_thread().name)
    )
    with threads.ReleasingExecutor(1, thread_name_prefix="t-io") as pool:
        assert pool.submit(sum, [1, 2, 3]).result() == 6
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result()
    assert len(released) == 2 and all(name.startswith("t-io") for name in released)


def test_capability_reports_what_the_kernels_choose_from() -> None:
    cap = threads.capability()
    assert cap.torch_cpu == torch.backends.cpu.get_cpu_capability()
    assert cap.cores >= 1 and cap.cpu
    assert set(cap.isa) <= set(threads._ISA_FLAGS.values())
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert ("avx2" in cap.isa) == ("avx2" in flags)
    assert cap.bf16_dot == (bool({"avx512_bf16", "amx_bf16"} & set(cap.isa)) and threads._onednn_bf16())
    assert cap.as_dict()["isa"] == list(cap.isa) and cap.cpu in cap.line()
    assert (cap.cuda is None) == (not torch.cuda.is_available())
