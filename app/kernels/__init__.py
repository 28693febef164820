"""Native CPU kernels, compiled on this machine at first use: the ``int4`` format's matmul
(``q4.cpp``: 4-bit weights in groups of 32, activations rounded to 8 bits per group of 32, integer
dot products; llama.cpp's Q4_1 x Q8_1 scheme), with a decoder layer's norms and SwiGLU in front of
it and its residual add behind it, a decode step's attention (``attention.cpp``) and each row's
LoRA deltas (``lora.cpp``).

Why our own: PyTorch's packed int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) dequantizes every
weight to float for every row, so a prefill of a few rows costs several times a decode step, and it
runs only where the CPU has bf16 dot products (elsewhere int4 dequantized the whole matrix per call).
This one reads each weight once per call whatever the rows, multiplies in 8-bit integers (VNNI on
AVX-512, ``vpmaddubsw`` on AVX2) and scales once per group (docs/quantization.md has the numbers).

The source is compiled with the machine's C++ compiler (``g++``, or ``$CXX``) into the cache folder,
named by a hash of the source and the compiler, and loaded with ctypes; its threads are torch's own
OpenMP team (the library links the ``libgomp.so.1`` torch already loaded). Without a compiler, a
CPU without AVX2, or ``ADAPTERSERVE_NATIVE_KERNELS=false``, :func:`q4` is None and ``int4`` keeps
PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from app.kernels.lora_table import Lora4 as Lora4
from app.kernels.lora_table import Lora8 as Lora8
from app.kernels.lora_table import LoraTable as LoraTable
from app.kernels.lora_table import LoraWeights as LoraWeights
from app.kernels.lora_table import dequantize_lora as dequantize_lora
from app.kernels.lora_table import fits8 as fits8
from app.kernels.lora_table import quantize_lora as quantize_lora
from app.kernels.lora_table import quantize_lora4 as quantize_lora4

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("q4.cpp", "attention.cpp", "lora.cpp")]
HEADERS = [
    Path(__file__).with_name(name)
    for name in ("vexp.h", "attention_bf16.h", "attention_common.h", "lora.h", "lora_float.h", "lora_int4.h")
]
GROUP = 32  # inputs per scale (weights and activations)
TILE = 16  # outputs per tile of the weight layout
ISAS = {1: "avx2", 2: "avx512-vnni"}


@dataclass
class _Config:
    folder: Path = Path.home() / ".cache" / "adapterserve"  # (ADAPTERSERVE_CACHE_DIR's default)
    enabled: bool = True


_config = _Config()


def configure(cache_dir: Path, enabled: bool = True) -> None:
    """Where the compiled kernels are kept, and whether to use them (before the model loads; a
    kernel already loaded stays loaded when only the folder changes)."""
    if _config.enabled != enabled:
        q4.cache_clear()
    _config.folder, _config.enabled = cache_dir, enabled


@dataclass(frozen=True)
class Q4:
    """The loaded int4 kernel."""

    lib: ctypes.CDLL
    isa: int
    bf16: bool = False  # attention's dot products on bf16 (avx512_bf16; attention_bf16.h)

    @property
    def name(self) -> str:
        return ISAS[self.isa]

    def matmul(
        self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` [rows, in] (float32) times the weights ``packed`` / ``scales`` (:func:`pack`,
        :func:`pack8`), plus ``bias``: [rows, out] float32."""
        x = x.to(torch.float32).contiguous()  # (the kernel reads float32 rows in place)
        rows, width = x.shape
        out = scales.shape[0] * TILE
        y = torch.empty(rows, out, dtype=torch.float32)
        self.lib.q4_matmul(
            self.isa,
            bits(packed, scales),
            x.data_ptr(),
            rows,
            width,
            out,
            packed.data_ptr(),
            scales.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
        )
        return y

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        y: torch.Tensor,
        *,
        norm: tuple[torch.Tensor, float] | None = None,
        swiglu: bool = False,
        rows_out: torch.Tensor | None = None,
        accumulate: bool = False,
        lora: LoraTable | None = None,
    ) -> None:
        """``y`` [rows, out] (float32, contiguous) = (or ``+=`` with ``accumulate``) the product
        of the packed weights with ``x`` [rows, in] float32 contiguous, or with its RMS ``norm``
        (weight [in] float32, epsilon), or with ``swiglu``: silu(x[:, :in]) * x[:, in:] of ``x``
        [rows, 2 in]; ``rows_out`` [rows, in] receives the rows multiplied (normalized / SwiGLU);
        ``lora``: each row's LoRA deltas of the rows multiplied added too (as :meth:`lora_rows`),
        their weights brought into the caches while the base's tiles compute."""
        rows = x.shape[0]
        width = x.shape[1] // 2 if swiglu else x.shape[1]
        prologue = 1 if norm is not None else 2 if swiglu else 0
        self.lib.q4_linear(
            self.isa,
            bits(packed, scales),
            prologue,
            x.data_ptr(),
            rows,
            width,
            scales.shape[0] * TILE,
            None if norm is None else norm[0].data_ptr(),
            0.0 if norm is None else norm[1],
            None if rows_out is None else rows_out.data_ptr(),
            packed.data_ptr(),
            scales.data_ptr(),
            None if bias is None else bias.data_ptr(),
            int(accumulate),
            y.data_ptr(),
            *(_NO_LORA if lora is None else lora.args),
        )

    def attend(
        self,
        qkv: torch.Tensor,
        heads: tuple[int, int, int],
        rotary: tuple[torch.Tensor, torch.Tensor],
        norms: tuple[torch.Tensor | None, torch.Tensor | None, float],
        cache: tuple[torch.Tensor, torch.Tensor, int],
        mask: torch.Tensor | None,
        scale: float,
        out: torch.Tensor,
        causal: bool = False,
    ) -> None:
        """One decode step's attention of ``qkv`` [rows, (heads + 2 kv heads) x dim] (q, k, v
        side by side; ``heads``: (heads, kv heads, dim)): q and k normalized per head by
        ``norms`` (q's weight, k's weight, epsilon; None: not) and rotated (``rotary``: cos,
        sin [rows, dim]), the new key and value written at column ``cache[2]`` of the buffers
        ``cache[:2]`` [capacity, kv heads, columns, dim], attended over the columns up to it
        where ``mask`` [rows, >= columns] (uint8, right-aligned; None: all), into ``out``
        [rows, heads x dim]. Float32, contiguous; the buffers float32, or bf16 where ``bf16``.
        ``causal``: the rows are consecutive new tokens of the buffers' first row instead (a
        prefill chunk of one sequence), token i written at column ``cache[2] + i`` and attending
        to the columns up to it (``mask`` ignored)."""
        h, kv, dim = heads
        k_buf, v_buf, column = cache
        q_norm, k_norm, eps = norms
        cos, sin = rotary
        done = self.lib.step_attend(
            self.isa,
            qkv.shape[0],
            h,
            kv,
            dim,
            qkv.data_ptr(),
            qkv.stride(0),
            0,
            h * dim,
            (h + kv) * dim,
            cos.data_ptr(),
            sin.data_ptr(),
            None if q_norm is None else q_norm.data_ptr(),
            None if k_norm is None else k_norm.data_ptr(),
            eps,
            k_buf.data_ptr(),
            v_buf.data_ptr(),
            k_buf.stride(0),
            k_buf.stride(1),
            column,
            None if mask is None else mask.data_ptr(),
            0 if mask is None else mask.stride(0),
            scale,
            out.data_ptr(),
            int(causal),
            int(self.bf16),
            int(k_buf.dtype == torch.bfloat16),
        )
        if done != 0:
            raise ValueError(
                "bf16 keys and values need the bf16 attention (Q4.bf16 on a CPU with avx512_bf16)"
            )

    def lora_rows(self, x: torch.Tensor, y: torch.Tensor, table: LoraTable) -> None:
        """Add each row's LoRA deltas of ``x`` [rows, in] to ``y`` [rows, out] (float32,
        contiguous rows) as ``table`` lays them out (:class:`LoraTable`)."""
        self.lib.lora_rows(
            self.isa,
            x.shape[0],
            table.args[1],
            x.data_ptr(),
            x.shape[1],
            y.data_ptr(),
            y.stride(0),
            table.args[0],
            *table.args[2:],
        )


_NO_LORA = (None, 0, None, None, None)  # q4_linear's last arguments without a LoRA table


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _build(compiler: str, folder: Path) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    text = b"".join(s.read_bytes() for s in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(text + version.encode()).hexdigest()[:16]
    target = folder / f"q4-{digest}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        flags = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
        command = [compiler, *flags, *map(str, SOURCES), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(done.stderr.strip()[-2000:])
        os.replace(partial, target)  # (several processes may build it at once: each replace is whole)
        log.info("compiled the int4 CPU kernel into %s", target)
    return target


@functools.cache
def q4() -> Q4 | None:
    """The int4 kernel on this machine, or None (see the module docstring)."""
    if not _config.enabled:
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (g++): int4 runs PyTorch's kernels (slower; docs/quantization.md)")
        return None
    folder = _config.folder / "kernels"
    try:
        lib = ctypes.CDLL(str(_build(compiler, folder)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        log.warning("the int4 CPU kernel did not build (%s): int4 runs PyTorch's kernels", exc)
        return None
    lib.q4_isa.restype = ctypes.c_int
    lib.q4_matmul.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.q4_matmul.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.q4_linear.restype = None
    lib.step_attend.restype = ctypes.c_int
    c_int, f32 = ctypes.c_int, ctypes.c_float
    lib.q4_linear.argtypes = [c_int, c_int, c_int, ptr, i64, i64, i64, ptr, f32, ptr, ptr, ptr, ptr]
    lib.q4_linear.argtypes += [c_int, ptr, ptr, i64, ptr, ptr, ptr]
    lib.step_attend.argtypes = [c_int, *[i64] * 4, ptr, *[i64] * 4, ptr, ptr, ptr, ptr, f32, ptr, ptr]
    lib.step_attend.argtypes += [i64, i64, i64, ptr, i64, f32, ptr, c_int, c_int, c_int]
    lib.attend_bf16_supported.restype = ctypes.c_int
    lib.lora_rows.restype = None
    lib.lora_rows.argtypes = [c_int, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr]
    isa = int(lib.q4_isa())
    if isa == 0:
        log.info("this CPU has no AVX2: int4 runs PyTorch's kernels")
        return None
    return Q4(lib, isa, bf16=isa == 2 and bool(lib.attend_bf16_supported()))


def fits(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a layer of this shape."""
    return out_features % TILE == 0 and in_features % GROUP == 0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [out, in] as 4-bit groups of 32 along the input: (q [out, in] uint8 in 0..15,
    d and m [out, in / 32] float16) with ``w ≈ d · q + m`` (m: the group's least value)."""
    w = w.detach().float()
    out, width = w.shape
    g = w.reshape(out, width // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    d = ((hi - lo) / 15).to(torch.float16)
    m = lo.to(torch.float16)
    d32, m32 = d.float()[..., None], m.float()[..., None]
    q = torch.where(d32 > 0, (g - m32) / d32, 0.0).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(out, width), d, m


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of :func:`quantize`'s values: (weights uint8 [tiles, groups x 256],
    scales float16 [tiles, groups, 2, 16]); tiles of 16 outputs, so layers laid end to end along
    the outputs are one layer."""
    out, width = q.shape
    tiles, groups = out // TILE, width // GROUP
    # input k = 32 g + 8 c + 4 h + j; byte (lane, j) of chunk c holds h = 0 low, h = 1 high
    v = q.reshape(tiles, TILE, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # t, g, c, lane, j, h
    packed = (v[..., 0] | (v[..., 1] << 4)).contiguous().reshape(tiles, groups * 256)
    scales = torch.stack([d, m], dim=0).reshape(2, tiles, TILE, groups).permute(1, 3, 0, 2).contiguous()
    return packed, scales


def quantize8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [out, in] as 8-bit groups of 32 along the input, symmetric: (u [out, in] uint8 in
    1..255, d and m = -128 d [out, in / 32] float16) with ``w ≈ d · u + m`` (= d · (u - 128))."""
    w = w.detach().float()
    out, width = w.shape
    g = w.reshape(out, width // GROUP, GROUP)
    d = (g.abs().amax(dim=2) / 127).to(torch.float16)
    d32 = d.float()[..., None]
    q = torch.where(d32 > 0, g / d32, 0.0).round().clamp(-127, 127)
    return (q + 128).to(torch.uint8).reshape(out, width), d, d * -128


def pack8(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of :func:`quantize8`'s values: (weights uint8 [tiles, groups x 512],
    scales as :func:`pack`'s); byte (lane, j) of chunk c of a group is input 32 g + 4 c + j."""
    out, width = u.shape
    tiles, groups = out // TILE, width // GROUP
    packed = u.reshape(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    scales = torch.stack([d, m], dim=0).reshape(2, tiles, TILE, groups).permute(1, 3, 0, 2).contiguous()
    return packed.reshape(tiles, groups * 512), scales


def bits(packed: torch.Tensor, scales: torch.Tensor) -> int:
    """4 or 8: the weights' width in a packed layer."""
    return 4 if packed.shape[1] == scales.shape[1] * 256 else 8


def _values(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The integers [out, groups, 32] of a packed layer (4 bits: q; 8 bits: u)."""
    tiles, groups = scales.shape[0], scales.shape[1]
    if bits(packed, scales) == 8:
        b = packed.reshape(tiles, groups, 8, TILE, 4).permute(0, 3, 1, 2, 4)
        return b.reshape(tiles * TILE, groups, GROUP)
    b = packed.reshape(tiles, groups, 4, TILE, 4)
    v = torch.stack([b & 15, b >> 4], dim=-1)  # t, g, c, lane, j, h
    return v.permute(0, 3, 1, 2, 5, 4).reshape(tiles * TILE, groups, GROUP)


def unpack(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weights [out, in] a :func:`pack`-ed (or :func:`pack8`-ed) layer computes with."""
    tiles, groups = scales.shape[0], scales.shape[1]
    q = _values(packed, scales).float()
    d, m = scales.float().permute(0, 3, 1, 2).reshape(tiles * TILE, groups, 2).unbind(-1)
    return (q * d[..., None] + m[..., None]).reshape(tiles * TILE, groups * GROUP)


def rows8(packed: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (any shape) of a :func:`pack8`-ed matrix, float32 [..., in] (token embeddings
    read from the LM head's layout: one copy for both)."""
    tiles, groups = scales.shape[0], scales.shape[1]
    flat = ids.reshape(-1)
    t, lane = flat // TILE, flat % TILE
    u = packed.view(tiles, groups, 8, TILE, 4).permute(0, 3, 1, 2, 4)[t, lane]  # [n, groups, 8, 4]
    d = scales[:, :, 0].permute(0, 2, 1)[t, lane].float()  # [n, groups]
    rows = (u.reshape(-1, groups, GROUP).float() - 128) * d[..., None]
    return rows.reshape(*ids.shape, groups * GROUP)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., in] rounded as the kernel rounds its input: 8 bits per group of 32 along the
    last axis, scaled by the group's largest magnitude (the values it multiplies; gradients pass
    straight through)."""
    g = x.reshape(*x.shape[:-1], -1, GROUP)
    d = g.detach().abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(d > 0, g.detach() / d, 0.0).round().clamp(-127, 127)
    rounded = (q * d).reshape(x.shape)
    return x + (rounded - x).detach()
