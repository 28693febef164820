"""Quantized matmul kernels on this machine, for choosing the quantized base's kernels: fp32
``F.linear`` against bf16 (a plain bf16 matmul, and the served one: weights packed once for
oneDNN), PyTorch's own weight-only int8 (``_weight_int8pack_mm``: per output channel)
and int4 (``_weight_int4pack_mm_for_cpu``: group-wise) kernels, adapterserve's own int4 kernel
(``app/kernels``: 4-bit weights times activations rounded to 8 bits per group of 32), torchao's
weight-only int8 and int4 tensors when torchao is importable (not a dependency), and two integer
matmuls that also quantize the activations (w8a8): ``torch._int_mm`` and fbgemm's dynamic linear.

    python -m bench.quant_kernels [--rows 1 16 64] [--repeats 200] [--layers 30]

Shapes: the default base's (SmolLM2-135M) linear layers, one decoder layer's worth (q, k, v, o,
gate, up, down), or ``--layers`` of them with distinct weights (30: as many bytes as the base
reads per step, more than the CPU's caches hold). Prints one markdown table: microseconds per
stack and the rate relative to fp32 (median of the turns' ratios), measured in turns; "served"
rows are what ``app.models.quantized_layers.QuantizedLinear`` runs on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from app import kernels
from app.models.quantized_layers import INT4_GROUP, QuantizedLinear, _int4_groups, _int8_rows
from bench.common import machine_line

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _torchao(kind: str, layers: list[nn.Linear]) -> list[nn.Module] | None:
    """The layers as torchao tensors (int8: ``Int8WeightOnlyConfig``; int4: the CPU tinygemm
    tensor, ``Int4OpaqueTensor``; w8a8: ``Int8DynamicActivationInt8WeightConfig``), or None
    without torchao."""
    try:
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        return None
    out: list[nn.Module] = []
    for layer in layers:
        copy = nn.Linear(layer.in_features, layer.out_features, bias=False)
        copy.weight.data.copy_(layer.weight.data)
        if kind == "int8":
            quantize_(copy, Int8WeightOnlyConfig())
        elif kind == "w8a8":
            quantize_(copy, Int8DynamicActivationInt8WeightConfig())
        else:
            packed = Int4OpaqueTensor.from_hp(copy.weight.data, [1, 64])
            copy.weight = nn.Parameter(packed, requires_grad=False)
        out.append(copy)
    return out


class _AtenInt8(nn.Module):
    """PyTorch's int8 weight-packed kernel at every row count."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.q, self.s = _int8_rows(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.s)


class _AtenInt4(nn.Module):
    """PyTorch's CPU int4 weight-packed (tinygemm layout) kernel."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        q, scale, zero = _int4_groups(layer.weight, INT4_GROUP)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.sz = torch.stack([scale.t(), zero.t()], dim=2).contiguous().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (on bf16 activations, as int4 ran before)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, INT4_GROUP, self.sz)
        return y.float()


class _Avx2Path(nn.Module):
    """Our int4 kernel's AVX2 path, on a CPU that also has the AVX-512 VNNI one (what an AVX2-only
    machine runs)."""

    def __init__(self, layer: nn.Linear, kernel: kernels.Q4) -> None:
        super().__init__()
        self.kernel = kernels.Q4(kernel.lib, 1)
        self.packed, self.scales = kernels.pack(*kernels.quantize(layer.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.matmul(x, self.packed, self.scales, None)


class _IntMM(nn.Module):
    """int8 activations (per row) times int8 weights through ``torch._int_mm`` (int32 sums)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        q, self.s = _int8_rows(layer.weight)
        self.qt = q.t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = x.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
        xq = torch.round(x / amax).to(torch.int8)
        return torch._int_mm(xq, self.qt).float().mul_(amax).mul_(self.s)


class _PlainBf16(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.w = layer.weight.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.w).float()


def _int4_kernel() -> str:
    kernel = kernels.q4()
    return f"adapterserve's kernel, 8-bit activations, {kernel.name}" if kernel else "PyTorch's kernels"


def _runner(mods: list[nn.Module], xs: dict[int, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for (_, i), m in zip(SHAPES * (len(mods) // len(SHAPES)), mods, strict=True):
            m(xs[i])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument(
        "--layers", type=int, default=1, help="decoder layers of distinct weights (30: the whole base's)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [nn.Linear(i, o, bias=False) for _ in range(args.layers) for o, i in SHAPES]
    stacks: dict[str, list[nn.Module]] = {
        "fp32 F.linear": list(layers),
        "bf16: F.linear on bf16 weights (oneDNN reorders them per call)": [_PlainBf16(m) for m in layers],
        "bf16: served (weights packed once for oneDNN where the CPU has bf16 dot products)": [
            QuantizedLinear.of(m, "bf16") for m in layers
        ],
        "int8: PyTorch _weight_int8pack_mm": [_AtenInt8(m) for m in layers],
        "int8: served": [QuantizedLinear.of(m, "int8") for m in layers],
        "int4 g32: PyTorch _weight_int4pack_mm_for_cpu, bf16 activations": [_AtenInt4(m) for m in layers],
        f"int4 g32: served ({_int4_kernel()})": [QuantizedLinear.of(m, "int4") for m in layers],
        "w8a8: torch._int_mm (int8 rows × int8)": [_IntMM(m) for m in layers],
        "w8a8: served (fbgemm, 16 float channels; one kernel per layer)": [
            QuantizedLinear.of(m, "w8a8", torch.rand(m.in_features) + 0.5) for m in layers
        ],
    }
    kernel = kernels.q4()
    if kernel is not None and kernel.isa > 1:
        stacks["int4 g32: adapterserve's kernel, its AVX2 path"] = [_Avx2Path(m, kernel) for m in layers]
    for kind in ("int8", "int4", "w8a8"):
        quantized = _torchao(kind, layers)
        if quantized is not None:
            label = "int8 activations and weights" if kind == "w8a8" else "weight-only"
            stacks[f"{kind}: torchao {label}"] = quantized
    print(machine_line())
    print("\n| kernel | " + " | ".join(f"{r} rows: µs (vs fp32)" for r in args.rows) + " |")
    print("|---|" + "---:|" * len(args.rows))
    results: dict[str, list[str]] = {name: [] for name in stacks}
    for rows in args.rows:
        xs = {i: torch.randn(rows, i) for _, i in SHAPES}

        times: dict[str, list[float]] = {name: [] for name in stacks}
        with torch.inference_mode():
            for _ in range(args.turns):
                for name, mods in stacks.items():
                    run = _runner(mods, xs)
                    run()
                    start = time.perf_counter()
                    for _ in range(args.repeats):
                        run()
                    times[name].append((time.perf_counter() - start) / args.repeats * 1e6)
        base = times["fp32 F.linear"]
        for name, values in times.items():
            ratio = statistics.median(b / v for b, v in zip(base, values, strict=True))
            results[name].append(f"{statistics.median(values):.0f} ({ratio:.2f}x)")
    for name, cells in results.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
