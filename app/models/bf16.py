"""``bf16``: the base's weights rounded to bfloat16, activations rounded to bfloat16 inside each
matmul (fp32 accumulation), outputs back in the compute dtype; everything between the matmuls
(norms, attention, residuals, every adapter) stays in the compute dtype.

Why a format of its own rather than ``ADAPTERSERVE_DTYPE=bfloat16``: on a CPU, a whole bf16 model
runs its many small operations (LoRA's rank-r matmuls, norms, rotary embeddings) slower than fp32
(measured on an AMX Xeon: a rank-16 LoRA matmul 48 µs in bf16 against 9 µs in fp32), while the
big matmuls are where bf16 pays: half the bytes read per decode step, and the hardware's bf16 dot
products (AVX-512 BF16, AMX) at batch sizes where fp32 is compute-bound.

On a CPU with bf16 dot products (:attr:`app.platform.Capability.bf16_dot`) each weight is packed
once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``) and multiplied by oneDNN's
kernel (``mkldnn._linear_pointwise``), as ``torch.compile``'s weight freezing does: a plain bf16
``F.linear`` reorders the weights at every call (measured: 41 µs against 31 µs for a 576×576
layer at one row). Elsewhere (CUDA, CPUs without bf16 dot products) a plain bf16 matmul.

:class:`BF16Linear` is the same computation as an ``nn.Linear`` (for training adapters on the
weights and activations they are served with, and as PEFT's reference).
"""

from __future__ import annotations

import torch
from torch import nn

from app.platform import capability


def packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] (already bf16) packed for oneDNN, or None where a plain matmul is the
    right kernel (not a CPU tensor, or a CPU without bf16 dot products)."""
    if weight.device.type != "cpu" or not capability().bf16_dot:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def matmul(x: torch.Tensor, weight: torch.Tensor, onednn: torch.Tensor | None) -> torch.Tensor:
    """``x`` [rows, in] times the bf16 ``weight`` [out, in] (or its oneDNN packing), in bf16."""
    x = x.to(torch.bfloat16)
    if onednn is not None:
        return torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")
    return nn.functional.linear(x, weight)


class BF16Linear(nn.Linear):
    """A frozen ``nn.Linear`` computing as the ``bf16`` format does; ``weight`` holds bf16 values
    in the compute dtype (gradients flow through the casts)."""

    _w16: tuple[int, int, torch.Tensor] | None = None  # (data_ptr, version, the weights in bf16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(torch.bfloat16), self._bf16_weight()).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _bf16_weight(self) -> torch.Tensor:
        """The weights in bf16, converted once (they are frozen; a new tensor or an in-place
        change converts them again)."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._w16 is None or self._w16[:2] != key:
            self._w16 = (*key, w.detach().to(torch.bfloat16))
        return self._w16[2]

    @classmethod
    def of(cls, layer: nn.Linear, weight: torch.Tensor | None = None) -> BF16Linear:
        """``layer`` computing in bf16 (with ``weight`` instead of its own, when given: an int8 or
        int4 layer's weights, which its kernel multiplies by bf16 activations)."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        w = (layer.weight if weight is None else weight).detach().to(torch.bfloat16).to(layer.weight.dtype)
        new.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return new
