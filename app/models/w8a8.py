"""``w8a8``: int8 weights per output channel (as ``int8``) and int8 activations, quantized per row
on the fly, for CPUs whose only fast integer matmul is PyTorch's fbgemm dynamic linear.

Each row of the input is scaled to unit max magnitude, quantized on a fixed grid of 129 levels
(``round(u · 63.5) / 63.5``, the grid fbgemm picks for a tensor spanning [-1, 1] with its 7-bit
activation range) and multiplied by the int8 weights; the output row is scaled back. A guard row
holding -1 and 1 fixes fbgemm's per-tensor grid, so every row is quantized on its own and a row's
result does not depend on the batch it is in (a mixed batch computes what each row alone would).

On CPU the matmul is ``torch.ops.quantized.linear_dynamic`` (fbgemm, int8 × int8 with int32
sums; measured 2-3x fp32 at 1-64 rows on AVX2, ``bench/quant_kernels.py``). Elsewhere (CUDA) the
same numbers come from the activations snapped to the grid and PyTorch's int8 weight kernel.
:class:`W8A8Linear` is the same layer as an ``nn.Linear`` (for training adapters on it, with a
straight-through gradient, and for running HF PEFT on it as a reference).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

GRID = 63.5  # levels per unit: fbgemm's 7-bit grid for [-1, 1] (scale 2/127)
ALPHA = 0.5  # how much of an input channel's range moves into the weights (SmoothQuant's default)

# what the base reads once to find each layer's input ranges: prose, dialogue, code, numbers and a
# few languages (the channels that carry large activations are the model's, not the text's)
CALIBRATION = (
    "The committee met on Tuesday to discuss the budget for next year; after a long debate, the "
    "members agreed to fund the new library and postpone the road repairs until spring.",
    "Customer: my order #4411 never arrived and the tracking page shows nothing.\nAgent: I'm sorry "
    "to hear that. Could you confirm the e-mail address on the account?",
    "def mean(values: list[float]) -> float:\n    return sum(values) / len(values)  # empty -> error",
    "Q3 revenue rose 12.5% to $4.2 billion, while operating costs fell 3% year over year.",
    "Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.",
    "Le chat dort sur le canapé. Der Zug kommt um 8 Uhr an. El cielo está despejado hoy.",
    "<h1>Settings</h1><p>Click <b>Save</b> to keep your changes, or press Esc to cancel.</p>",
    "Once upon a time, a little fox lived at the edge of a great forest, and every night it "
    "looked up at the stars and wondered what lay beyond the hills.",
)


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer: Any, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest magnitude each named layer's input takes over
    :data:`CALIBRATION` (float32 [in] per layer)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        top = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        seen[name] = torch.maximum(seen[name], top) if name in seen else top

    hooks = [
        model.get_submodule(name).register_forward_hook(lambda _m, args, _o, n=name: record(n, args[0]))
        for name in names
    ]
    device = next(model.parameters()).device
    try:
        for text in CALIBRATION:
            model(**tokenizer(text, return_tensors="pt").to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def smoothing(weight: torch.Tensor, act_max: torch.Tensor | None) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``c`` (float32 [in]): the layer computes
    ``(x / c) · (W · c)ᵀ``, so a channel whose activations are large moves part of its range into
    the weights, where it is quantized per output channel, and rows quantize with finer steps."""
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    if act_max is None:
        return torch.ones_like(w_max)
    act = act_max.to(w_max.device).clamp(min=1e-5)
    return (act.pow(ALPHA) / w_max.pow(1 - ALPHA)).clamp(min=1e-5)


def pack(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed form of int8 weights [out, in] with a scale per output channel."""
    with warnings.catch_warnings():  # quantized tensors are only the packing's input here
        warnings.simplefilter("ignore")
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def unpack(packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weights and their scales back from :func:`pack`'s form."""
    qw, _ = torch.ops.quantized.linear_unpack(packed)
    return qw.int_repr(), qw.q_per_channel_scales().float()


def guard(width: int, device: torch.device) -> torch.Tensor:
    row = torch.zeros(1, width, device=device)
    row[0, 0], row[0, 1 % width] = 1.0, -1.0
    return row


def matmul(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    inv_smooth: torch.Tensor,
    packed: Any,
    guard_row: torch.Tensor,
) -> torch.Tensor:
    """``x`` [rows, in] divided by the smoothing factors, times the int8 weights, activations
    quantized per row (module docstring); ``packed`` (fbgemm) on CPU, else ``q`` and ``scale`` on
    the input's device."""
    x32 = x.float() * inv_smooth
    amax = x32.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
    if packed is not None:
        unit = torch.empty(x32.shape[0] + 1, x32.shape[1])
        torch.div(x32, amax, out=unit[:-1])
        unit[-1:] = guard_row
        y = torch.ops.quantized.linear_dynamic(unit, packed, True)[:-1]
    else:
        snapped = (x32 / amax).mul_(GRID).round_().div_(GRID).to(scale.dtype)
        y = torch.ops.aten._weight_int8pack_mm(snapped.contiguous(), q, scale).float()
    return y.mul_(amax).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the w8a8 layer; backward: the gradient of the float layer it quantizes (the
    activations' rounding passed straight through), so adapters below it train."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, layer: W8A8Linear) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return layer.quantized(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class W8A8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose forward is the w8a8 matmul; ``weight`` holds the int8 weights'
    float values (what the gradient flows through)."""

    q: torch.Tensor
    scale: torch.Tensor
    inv_smooth: torch.Tensor

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, inv_smooth: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        out, width = q.shape
        super().__init__(width, out, bias=bias is not None, device="meta")
        float_w = q.float() * scale.float()[:, None] * inv_smooth.float()
        self.weight = nn.Parameter(float_w, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("inv_smooth", inv_smooth.float())
        self._packed: Any = None

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        packed = None
        if flat.device.type == "cpu":
            if self._packed is None:
                self._packed = pack(self.q, self.scale)
            packed = self._packed
        y = matmul(flat, self.q, self.scale, self.inv_smooth, packed, guard(self.in_features, flat.device))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x, self.weight, self)
