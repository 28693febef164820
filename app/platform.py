"""Process-wide CPU tuning, in one place: called once by ``adapterserve serve`` (:func:`tune_process`);
and the machine's capability (:func:`capability`: instruction sets, CUDA), which chooses kernels and
formats at start.

Two facts about PyTorch on CPUs shape how the server runs; both were measured on the 2-core
machines this project is developed on and are explained below.

## OpenMP thread teams
One OpenMP thread team at a time: PyTorch's CPU ops compute fast only in the engine thread's.

PyTorch parallelizes CPU ops with OpenMP (libgomp). Every thread that runs a parallel op gets a
team of worker threads of its own, and the team stays for the life of that thread. Once a process
holds more OpenMP threads than CPUs (the thread that loaded the model keeps its team, and so does
every helper thread that validated or copied tensors), libgomp stops spinning between parallel
regions: every region then wakes its workers through the kernel. Measured on 2 CPU cores: 200
small LoRA matmuls take 6 ms in a thread whose team is the only one, 60-76 ms (10x) in the engine
thread while the main thread's idle team exists; a whole decode step 20-40 % slower.

So every thread but the engine's gives its team back when its work is done
(:func:`release_omp_threads`, OpenMP's ``omp_pause_resource_all``), and the engine thread gives
its own back when it goes idle. The next parallel op of that thread starts a new team (~0.1 ms).

## Freed memory
Process memory tuning: keep freed memory for reuse instead of handing it back to the OS.

glibc returns large freed blocks to the kernel at once (``munmap``, heap trimming). The next
forward pass then touches fresh pages, and every first touch is a page fault: cheap on bare metal,
costly in virtual machines (measured here: ~15 µs per 4 KiB page, i.e. ~60 ms for a rank-16
adapter's 19.5 MB, and 15-25 % of the engine's classification throughput). Raising the mmap and
trim thresholds keeps those pages mapped, which is what tcmalloc/jemalloc setups of other servers do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
_OMP_PAUSE_SOFT = 1
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
_TRIM_THRESHOLD = 1 << 30  # an int in mallopt's signature


def tune_process(keep_freed: bool = True) -> None:
    """Apply the process-wide tuning (once, at start, before the model is loaded)."""
    if keep_freed:
        keep_freed_memory()


# --- OpenMP teams ---------------------------------------------------------------------------
@functools.cache
def _pause() -> Callable[[int], int] | None:
    """libgomp's ``omp_pause_resource_all`` as loaded by torch, or None (another OpenMP runtime)."""
    for candidate in (str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"), "libgomp.so.1"):
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        fn = getattr(lib, "omp_pause_resource_all", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int]
            fn.restype = ctypes.c_int
            return fn
    log.debug("no libgomp with omp_pause_resource_all; OpenMP teams are left as they are")
    return None


def release_omp_threads() -> None:
    """Let the worker threads of the calling thread's OpenMP team exit (cheap when it has none)."""
    pause = _pause()
    if pause is not None:
        pause(_OMP_PAUSE_SOFT)


def releasing(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` that gives its thread's OpenMP team back when it returns (for helper threads)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_omp_threads()

    return run


class ReleasingExecutor(ThreadPoolExecutor):
    """A thread pool whose threads give their OpenMP teams back after each job (the event loop's
    default executor: model loading, adapter validation and host loads run there)."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        return super().submit(releasing(fn), *args, **kwargs)


# --- freed memory --------------------------------------------------------------------------
def keep_freed_memory() -> bool:
    """Tune glibc's malloc (no-op elsewhere); return whether it applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    log.debug("malloc keeps freed memory: %s", ok)
    return ok


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the system now (glibc's ``malloc_trim``; no-op
    elsewhere): after a one-time release of much memory, such as the float weights of a base that
    was just quantized, which :func:`keep_freed_memory` would otherwise keep."""
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        trim = None
    return bool(trim(0)) if trim is not None else False


# --- capability ----------------------------------------------------------------------------
_ISA_FLAGS = {  # /proc/cpuinfo flag -> the name reported
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_bf16": "avx512_bf16",
    "avx512_vnni": "vnni",
    "avx_vnni": "avx_vnni",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


@dataclass(frozen=True)
class Capability:
    """What the machine offers the kernels: the CPU's model and instruction sets, PyTorch's CPU
    dispatch level, and CUDA's device and compute capability when there is one."""

    cpu: str
    isa: tuple[str, ...]  # of _ISA_FLAGS' names, those the CPU reports
    torch_cpu: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512...
    cores: int
    cuda: str | None = None  # "NVIDIA H100 80GB HBM3 (sm_90)"

    @property
    def bf16_dot(self) -> bool:
        """The CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), and PyTorch's oneDNN uses it."""
        return bool({"avx512_bf16", "amx_bf16"} & set(self.isa)) and _onednn_bf16()

    def line(self) -> str:
        isa = " ".join(self.isa) or "no AVX2"
        cuda = f", CUDA {self.cuda}" if self.cuda else ""
        return f"{self.cpu}, {self.cores} cores, {isa} (torch {self.torch_cpu}){cuda}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "isa": list(self.isa),
            "torch_cpu": self.torch_cpu,
            "cores": self.cores,
            "bf16_dot": self.bf16_dot,
            "cuda": self.cuda,
        }


def _onednn_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    except RuntimeError:
        return False


@functools.cache
def capability() -> Capability:
    """The machine's capability, probed once (Linux's /proc/cpuinfo; elsewhere only PyTorch's view)."""
    fields: dict[str, str] = {}  # the first processor's
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    cuda = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cuda = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return Capability(
        cpu=cpu,
        isa=tuple(name for flag, name in _ISA_FLAGS.items() if flag in flags),
        torch_cpu=torch.backends.cpu.get_cpu_capability(),
        cores=os.cpu_count() or 1,
        cuda=cuda,
    )
