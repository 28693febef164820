"""The quantized layers of the base: :class:`QuantizedLinear` (bf16, int8, int4, or a part of a
w8a8 kernel) and :class:`QuantizedEmbedding` (int8 or bf16 rows); the formats are described in
:mod:`app.models.quantize`.

The matmuls, chosen by measurement (``bench/quant_kernels.py``, docs/quantization.md): on CUDA,
PyTorch's own weight-packed kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm``). On a CPU
with bf16 dot products (:attr:`app.platform.Capability.bf16_dot`) the CPU versions of the same
kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) on activations rounded to bf16,
which read the packed weights inside the matmul (measured on an AMX Xeon, every linear layer of
the default base: int8 5.6 ms and int4 4.9 ms at one row against 43 and 135 ms for the paths
below, still ahead at 32 rows; so those formats round activations as ``bf16`` does, see
:func:`rounds_activations`). Elsewhere those kernels have no fast path (measured on an AVX2
machine with float activations: 0.4x fp32 for one row, 0.06x for 16), so there int8 converts the
int8 weights to the compute dtype for one BLAS matmul (as torchao's weight-only int8 does; 0.8-1.1x
fp32 at 1-64 rows), and int4 keeps two 4-bit values per byte and dequantizes them for one BLAS
matmul (0.3-0.55x).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from app import kernels
from app.models import bf16, w8a8
from app.platform import capability

log = logging.getLogger(__name__)

Kind = Literal["bf16", "int8", "int4", "w8a8"]
INT4_GROUP = 32


def packed_cpu_kernels(device: torch.device) -> bool:
    """int8 and int4 run PyTorch's packed CPU kernels on bf16 activations on ``device``."""
    return device.type == "cpu" and capability().bf16_dot


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q [rows, cols] int8, scale [rows] float32)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 (tinygemm): (q [out, in] int32 in [0, 15], scale and zero
    [out, in / group] float32) with ``w ≈ (q - 8) · scale + zero``."""
    w = w.detach().float()
    out, width = w.shape
    g = w.reshape(out, width // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = lo + 8 * scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out, width), scale, zero


def _inner_k_tiles(width: int) -> int | None:
    """The CUDA int4 layout's tiling for an input width (None: it cannot take it)."""
    for tiles in (8, 4, 2):
        if width % (tiles * 16) == 0:
            return tiles
    return None


class QuantizedLinear(nn.Module):
    """A frozen linear layer with int8 or int4 weights (see the module docstring)."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kind: Kind,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        kernel: w8a8.Kernel | None = None,
        part: int = 0,
        onednn: torch.Tensor | None = None,
        cpu_kernel: bool = False,
        native: kernels.Q4 | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)  # int8: [out]; int4: scales and zeros [groups, out, 2]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.compute_dtype = dtype
        self.w8a8 = kernel  # w8a8: the layer's matmul (then ``packed`` and ``scales`` are empty),
        self.part = part  # perhaps shared with the layers that read the same input
        self.onednn = onednn  # bf16 packed for oneDNN (then ``packed`` is empty): not a buffer,
        # an opaque tensor that only oneDNN's kernels read
        self.cpu_kernel = cpu_kernel  # int8/int4: PyTorch's packed CPU kernels, bf16 activations
        self.native = native  # int4: our CPU kernel (app/kernels; ``packed``/``scales`` its layout)
        self.grad_weight: torch.Tensor | None = None  # the backward pass's weights, while it needs them

    @classmethod
    def of(cls, layer: nn.Linear, kind: Kind, act_max: torch.Tensor | None = None) -> QuantizedLinear:
        """``layer`` quantized on its own device; int4 falls back to int8 where the kernels cannot
        take the layer's shape; w8a8 smoothed by its inputs' calibrated ranges ``act_max``."""
        w = layer.weight
        dtype, device = w.dtype, w.device
        out, width = w.shape
        cuda_unfit = device.type == "cuda" and _inner_k_tiles(width) is None
        if kind == "int4" and (width % INT4_GROUP or width % 2 or cuda_unfit):
            log.info("a %dx%d layer cannot take int4: int8", out, width)
            kind = "int8"
        if kind == "w8a8":
            return cls.w8a8_part(layer, w8a8.Kernel(w, act_max), 0)
        if kind == "bf16":
            return cls.bf16(w, layer.bias, dtype)
        native = kernels.q4() if kind == "int4" and device.type == "cpu" else None
        if native is not None and kernels.fits(out, width):
            packed, scales = kernels.pack(*kernels.quantize(w))
            return cls(width, out, kind, packed, scales, layer.bias, dtype, native=native)
        fast = packed_cpu_kernels(device)
        if kind == "int8":
            q, scale = _int8_rows(w)
            scale = scale.to(torch.bfloat16 if fast else dtype)
            return cls(width, out, kind, q, scale, layer.bias, dtype, cpu_kernel=fast)
        q, scale, zero = _int4_groups(w, INT4_GROUP)
        if fast:  # tinygemm's CPU layout, (scale, zero) per group and output in bf16
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            scales = torch.stack([scale.t(), zero.t()], dim=2).contiguous().to(torch.bfloat16)
        elif device.type == "cpu":  # two values per byte, and (scale, zero - 8 · scale) per group
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            scales = torch.stack([scale, zero - 8 * scale], dim=2).contiguous().to(dtype)
        else:
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(width))
            scales = torch.stack([scale.t(), zero.t()], dim=2).contiguous().to(dtype)
        return cls(width, out, kind, packed, scales, layer.bias, dtype, cpu_kernel=fast)

    @classmethod
    def bf16(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantizedLinear:
        """A layer of ``weight`` [out, in] rounded to bf16 (packed for oneDNN where it is fast)."""
        out, width = weight.shape
        w = weight.detach().to(torch.bfloat16).contiguous()
        onednn = bf16.packed(w)
        empty = w.new_empty(0)
        return cls(width, out, "bf16", w if onednn is None else empty, empty, bias, dtype, onednn=onednn)

    @classmethod
    def w8a8_part(cls, layer: nn.Linear, kernel: w8a8.Kernel, part: int) -> QuantizedLinear:
        """``layer`` as part ``part`` of a w8a8 kernel (:func:`app.models.w8a8.kernels`)."""
        out, width = layer.weight.shape
        empty = torch.empty(0, device=layer.weight.device)
        dtype = layer.weight.dtype
        return cls(width, out, "w8a8", empty.to(torch.int8), empty, layer.bias, dtype, kernel, part)

    @property
    def weight_bytes(self) -> int:
        tensors = [self.packed, self.scales] + ([self.bias] if self.bias is not None else [])
        kernel = 0 if self.onednn is None else 2 * self.in_features * self.out_features
        if self.w8a8 is not None:  # its share of a kernel
            kernel = self.w8a8.weight_bytes * self.out_features // self.w8a8.out_features
        return kernel + sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # token attributions: through the kernel
            out: torch.Tensor = _ThroughKernel.apply(x, self)
            return out
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native is not None:
            y = self.native.matmul(flat.float(), self.packed, self.scales, None).to(self.compute_dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        if self.kind == "bf16":
            return self._bf16(flat).view(*x.shape[:-1], self.out_features)
        if self.cpu_kernel:
            y = self._packed_bf16(flat.to(torch.bfloat16).contiguous()).to(self.compute_dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        if flat.dtype != self.compute_dtype:
            flat = flat.to(self.compute_dtype)
        cpu = self.packed.device.type == "cpu"
        if self.w8a8 is not None:
            y = self.w8a8.part(self.part, flat).to(self.compute_dtype)
        elif self.kind == "int8" and not cpu:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.packed, self.scales)
        elif self.kind == "int8":
            y = nn.functional.linear(flat, self.packed.to(self.compute_dtype)).mul_(self.scales)
        elif cpu:
            y = nn.functional.linear(flat, self._int4_weights())
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat.contiguous(), self.packed, INT4_GROUP, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def bf16_kernel(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The layer's matmul on bf16 rows [rows, in] (contiguous), bf16 out [rows, out] and the
        bias not added, where the layer computes on bf16 activations (``bf16``; int8 and int4 on
        the packed CPU kernels); None elsewhere. For callers that round one input once for
        several layers (:mod:`app.models.one_row`)."""
        if self.kind == "bf16":
            packed, onednn = self.packed, self.onednn
            return lambda x: bf16.matmul(x, packed, onednn)
        if not self.cpu_kernel:
            return None
        packed, scales = self.packed, self.scales
        if self.kind == "int8":
            return lambda x: torch.ops.aten._weight_int8pack_mm(x, packed, scales)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales)

    def float_kernel(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The layer's matmul on float32 rows [rows, in], float32 out [rows, out], the bias added,
        where our int4 kernel computes it (it rounds its input itself); None elsewhere."""
        native = self.native
        if native is None or self.compute_dtype != torch.float32:
            return None
        packed, scales = self.packed, self.scales
        bias = self.bias if self.bias is not None and self.bias.dtype == torch.float32 else None
        if bias is None and self.bias is not None:
            return None
        return lambda x: native.matmul(x, packed, scales, bias)

    def reference(self, layer: nn.Linear) -> nn.Linear | None:
        """``layer`` as a float module computing what this one computes (for training on the
        served weights, and as PEFT's reference): None where that is ``layer`` with
        :meth:`dequantized` weights (no rounding of activations)."""
        if self.native is not None:
            return Q8Linear.of(layer, self.dequantized())
        if self.cpu_kernel:
            return bf16.BF16Linear.of(layer, self.dequantized())
        return None

    def _packed_bf16(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scales)

    def _bf16(self, flat: torch.Tensor) -> torch.Tensor:
        y = bf16.matmul(flat, self.packed, self.onednn).to(self.compute_dtype)
        return y if self.bias is None else y + self.bias

    def _int4_weights(self) -> torch.Tensor:
        """The int4 weights [out, in] in the compute dtype (CPU layout: two values per byte)."""
        out, groups = self.out_features, self.in_features // INT4_GROUP
        q = torch.empty(out, self.in_features, dtype=self.compute_dtype, device=self.packed.device)
        q[:, 0::2] = self.packed >> 4
        q[:, 1::2] = self.packed & 15
        grouped = q.view(out, groups, INT4_GROUP)
        return torch.addcmul(self.scales[..., 1:], grouped, self.scales[..., :1]).view(out, self.in_features)

    @torch.no_grad()
    def backward_weight(self) -> torch.Tensor:
        """The weights [out, in] the input's gradient is multiplied by: :meth:`dequantized`, made
        once (one matmul per layer) and kept until :func:`drop_backward_weights` (bf16 on a CPU
        with bf16 dot products: half the memory, the hardware's matmul)."""
        if self.grad_weight is None:
            w = self.dequantized()
            fast = w.device.type == "cpu" and capability().bf16_dot
            self.grad_weight = w.to(torch.bfloat16) if fast else w
        return self.grad_weight

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The weights [out, in] this layer computes with, exactly: the kernel applied to the
        identity (each output is one weight times 1 plus zeros; w8a8: the weights it stands for,
        :meth:`~app.models.w8a8.Kernel.dequantized`)."""
        if self.w8a8 is not None:
            lo, hi = self.w8a8.bounds[self.part]
            return self.w8a8.dequantized()[lo:hi].to(self.compute_dtype)
        if self.native is not None:
            return kernels.unpack(self.packed, self.scales).to(self.compute_dtype)
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.packed.device)
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).t().contiguous()
        finally:
            self.bias = bias


class _ThroughKernel(torch.autograd.Function):
    """A quantized layer's kernel with a gradient for its input: ``grad · W`` with the weights the
    kernel computes with (:meth:`QuantizedLinear.backward_weight`: made at the first backward pass
    and kept until :func:`drop_backward_weights`, in bf16 where the CPU multiplies bf16). The
    weights themselves are frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        y = layer._forward(x)
        return y.clone() if y._is_view() else y  # (the caller may add to it in place)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.layer.backward_weight()  # [out, in]
        return (grad.to(w.dtype) @ w).to(grad.dtype), None


def drop_backward_weights(model: nn.Module) -> None:
    """Free the weights the quantized layers' backward passes kept (no explanation under way)."""
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            mod.grad_weight = None


class QuantizedEmbedding(nn.Module):
    """Token embeddings as int8 rows with a scale each, or as bf16 rows (a subclass's
    ``embed_scale`` kept); for ``int4`` on our CPU kernel, int8 in groups of 32 in the kernel's
    layout, so that a tied LM head multiplies them as the int4 layers multiply theirs."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, embedding: nn.Embedding, kind: Kind = "int8") -> None:
        super().__init__()
        self.kind: Kind = "bf16" if kind == "bf16" else "int8"
        rows, width = embedding.weight.shape
        cpu = embedding.weight.device.type == "cpu"
        self.native = kernels.q4() if kind == "int4" and cpu and kernels.fits(rows, width) else None
        if self.native is not None:
            q, scale = kernels.pack8(*kernels.quantize8(embedding.weight))
        elif self.kind == "bf16":
            q = embedding.weight.detach().to(torch.bfloat16).contiguous()
            scale = q.new_empty(0)
        else:
            q, scale = _int8_rows(embedding.weight)
        self.register_buffer("packed", q)
        self.register_buffer("scales", scale if self.native else scale.to(embedding.weight.dtype))
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = rows, width
        self.compute_dtype = embedding.weight.dtype
        scale_attr = getattr(embedding, "embed_scale", None)  # Gemma scales its embeddings
        self.embed_scale = None if scale_attr is None else torch.as_tensor(scale_attr).clone()

    @property
    def weight_bytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            rows = kernels.rows8(self.packed, self.scales, ids).to(self.compute_dtype)
        else:
            rows = self.packed[ids].to(self.compute_dtype)
        if self.kind == "int8" and self.native is None:
            rows = rows * self.scales[ids].unsqueeze(-1)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows

    def head(self, bias: torch.Tensor | None) -> QuantizedLinear:
        """A language-model head tied to these embeddings, reading the same int8 rows (bf16: the
        same values, packed for its kernel)."""
        if self.kind == "bf16":
            return QuantizedLinear.bf16(self.packed, bias, self.compute_dtype)
        width, rows, dtype = self.embedding_dim, self.num_embeddings, self.compute_dtype
        if self.native is not None:
            packed, scales, native = self.packed, self.scales, self.native
            return QuantizedLinear(width, rows, "int8", packed, scales, bias, dtype, native=native)
        fast = packed_cpu_kernels(self.packed.device)
        scales = self.scales.to(torch.bfloat16) if fast else self.scales
        return QuantizedLinear(width, rows, "int8", self.packed, scales, bias, dtype, cpu_kernel=fast)

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        if self.native is not None:
            return kernels.unpack(self.packed, self.scales).to(self.compute_dtype)
        if self.kind == "bf16":
            return self.packed.to(self.compute_dtype)
        return self.packed.to(self.compute_dtype) * self.scales.unsqueeze(-1)


class Q8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose input is rounded as the int4 CPU kernel rounds it (8 bits per
    group of 32 inputs, :func:`app.kernels.round_activations`; gradients pass straight through):
    with the kernel's weights, the same computation as the served int4 layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(kernels.round_activations(x), self.weight, self.bias)

    @classmethod
    def of(cls, layer: nn.Linear, weight: torch.Tensor) -> Q8Linear:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight = nn.Parameter(weight.detach().to(layer.weight.dtype).clone(), requires_grad=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return new
