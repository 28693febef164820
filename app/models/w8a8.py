"""``w8a8``: int8 weights per output channel and int8 activations quantized per row on the fly,
for CPUs whose only fast integer matmul is PyTorch's fbgemm dynamic linear.

A layer's input is divided by SmoothQuant's per-channel factors (calibrated once at load on
:data:`CALIBRATION`), which move part of a wide channel's range into the weights; its
:data:`OUTLIERS` widest channels stay in float32 against float weights. Each row of the rest is
scaled to unit max magnitude and quantized on a fixed 8-bit grid (steps of 2/255, the grid
fbgemm picks for a tensor spanning [-1, 1]) and multiplied by 7-bit weights (the most AVX2's
``u8 · s8`` pair sums take without saturating); the output row is scaled back. A guard row holding
-1 and 1 fixes fbgemm's per-tensor grid, so every row is quantized on its own and a row's result
does not depend on the batch it is in.

On CPU the matmul is ``torch.ops.quantized.linear_dynamic`` (fbgemm, integer products with int32
sums; measured 2-3x fp32 at 1-64 rows on AVX2, ``bench/quant_kernels.py``). Elsewhere (CUDA) the
same grid feeds PyTorch's int8 weight kernel. :class:`W8A8Linear` is the same layer as an
``nn.Linear`` (for training adapters on it, with a straight-through gradient, and for running HF
PEFT on it as a reference).

Rounding activations makes the layer sensitive to the last bits of its input: a float difference
elsewhere (attention over another batch shape) can move a value to the next step, so two ways of
computing the same tokens agree to about the quantization noise, not bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

STEP = 2 / 255  # fbgemm's 8-bit grid for a tensor spanning [-1, 1] (zero point 128: -128..127 steps)
WEIGHT_MAX = 63  # 7-bit weights: AVX2's u8·s8 pair sums cannot saturate int16 (255·63·2 < 2¹⁵)
OUTLIERS = 16  # input channels per layer kept in float32 (the widest after smoothing)
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


Calibration = tuple[dict[str, torch.Tensor], list[list[str]]]


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer: Any, names: Iterable[str]) -> Calibration:
    """Per input channel, the largest magnitude each named layer's input takes over
    :data:`CALIBRATION` (float32 [in] per layer); and the groups of layers that read the same
    input tensor (a decoder's q, k and v; gate and up), which then share one integer matmul."""
    seen: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}  # the first text's input of each layer, held (no reuse)
    collecting = [True]

    def record(name: str, x: torch.Tensor) -> None:
        top = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        seen[name] = torch.maximum(seen[name], top) if name in seen else top
        if collecting[0]:
            first.setdefault(name, x)

    hooks = [
        model.get_submodule(name).register_forward_hook(lambda _m, args, _o, n=name: record(n, args[0]))
        for name in names
    ]
    device = next(model.parameters()).device
    try:
        for text in CALIBRATION[:1]:
            model(**tokenizer(text, return_tensors="pt").to(device))
        by_input: dict[tuple[Any, ...], list[str]] = {}
        for name, x in first.items():
            version = 0 if x.is_inference() else x._version
            by_input.setdefault((x.data_ptr(), tuple(x.shape), x.stride(), version), []).append(name)
        first.clear()
        collecting[0] = False
        for text in CALIBRATION[1:]:
            model(**tokenizer(text, return_tensors="pt").to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen, [group for group in by_input.values() if len(group) > 1]


def kernels(
    model: nn.Module, names: list[str], calibration: Calibration | None, keep_int8: bool = False
) -> dict[str, tuple[Kernel, int]]:
    """Each named linear layer's kernel and its part in it: layers of a calibrated group share
    one kernel over their weights stacked (one activation pass and one integer matmul for all)."""
    act_max, groups = calibration or ({}, [])
    parts: dict[str, tuple[Kernel, int]] = {}
    for group in groups:
        if not all(n in names for n in group):
            continue
        layers = [cast(nn.Linear, model.get_submodule(n)) for n in group]
        stacked = torch.cat([layer.weight.detach() for layer in layers])
        widths = [int(layer.weight.shape[0]) for layer in layers]
        kernel = Kernel(stacked, act_max.get(group[0]), keep_int8, splits=widths)
        parts.update({n: (kernel, i) for i, n in enumerate(group)})
    for name in names:
        if name not in parts:
            layer = cast(nn.Linear, model.get_submodule(name))
            parts[name] = (Kernel(layer.weight, act_max.get(name), keep_int8), 0)
    return parts


def smoothing(weight: torch.Tensor, act_max: torch.Tensor | None, alpha: float = ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``c`` (float32 [in]): the layer computes
    ``(x / c) · (W · c)ᵀ``, so a channel whose activations are large moves part of its range into
    the weights, where it is quantized per output channel, and rows quantize with finer steps."""
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    if act_max is None:
        return torch.ones_like(w_max)
    act = act_max.to(w_max.device).clamp(min=1e-5)
    return (act.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def pack(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed form of int8 weights [out, in] with a scale per output channel."""
    with warnings.catch_warnings():  # quantized tensors are only the packing's input here
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor.* are deprecated", category=UserWarning
        )
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def unpack(packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weights and their scales back from :func:`pack`'s form."""
    qw, _ = torch.ops.quantized.linear_unpack(packed)
    return qw.int_repr(), qw.q_per_channel_scales().float()


class Kernel(nn.Module):
    """One layer's w8a8 matmul (module docstring), float32 in and out: the input divided by the
    smoothing factors, its :data:`OUTLIERS` widest channels (by calibration) kept in float32
    against float weights, the rest quantized per row and multiplied by the int8 weights."""

    q: torch.Tensor
    scale: torch.Tensor
    inv_smooth: torch.Tensor
    outliers: torch.Tensor
    outlier_w: torch.Tensor
    guard: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        act_max: torch.Tensor | None,
        keep_int8: bool = False,
        *,
        act_bits: int = 8,
        alpha: float | None = ALPHA,
        outliers: int = OUTLIERS,
        splits: list[int] | None = None,
    ) -> None:
        """``act_bits``, ``alpha`` (None: no smoothing) and ``outliers`` other than the defaults
        are for measuring what each part buys (``bench/w8a8_variants.py``); 7-bit activations
        take 8-bit weights. ``splits``: the output widths of the layers whose weights are stacked
        in ``weight`` (they read the same input; :meth:`part` gives each its output)."""
        super().__init__()
        w = weight.detach().float()
        out, width = w.shape
        device = w.device
        c = smoothing(w, act_max if alpha is not None else None, alpha or ALPHA)
        k = min(outliers, width // 16) if act_max is not None else 0
        top = (act_max.to(device).clamp(min=1e-5) / c).topk(k).indices if act_max is not None and k else None
        idx = torch.empty(0, dtype=torch.long, device=device) if top is None else top.sort().values
        inv = 1 / c
        inv[idx] = 0  # those channels go through the float path
        smoothed = w * c
        smoothed[:, idx] = 0
        weight_max = WEIGHT_MAX if act_bits == 8 else 127
        scale = (smoothed.abs().amax(dim=1) / weight_max).clamp(min=1e-12)
        q = torch.round(smoothed / scale[:, None]).clamp(-weight_max, weight_max).to(torch.int8)
        self.in_features, self.out_features = width, out
        self.levels = 2**act_bits - 1  # the activation grid: steps of 2 / levels
        ends = torch.tensor(splits or [out]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        # the last input and its output while the parts that read it are served (the input held,
        # so its memory cannot be reused by another tensor of the same address meanwhile)
        self._last: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor, torch.Tensor, set[int]] | None = None
        fbgemm = device.type == "cpu" and torch.backends.quantized.engine in ("x86", "fbgemm")
        self.packed: Any = pack(q, scale) if fbgemm else None  # (else: the grid, then int8 weights)
        self.register_buffer("q", q if keep_int8 or self.packed is None else q.new_empty(0))
        self.register_buffer("scale", scale)
        self.register_buffer("inv_smooth", inv)
        self.register_buffer("outliers", idx)
        self.register_buffer("outlier_w", w[:, idx].t().contiguous())  # [k, out]
        guard = torch.zeros(1, width, device=device)
        guard[0, 0], guard[0, 1 % width] = 1.0, -1.0
        self.register_buffer("guard", guard, persistent=False)

    @property
    def weight_bytes(self) -> int:
        tensors = [self.q, self.scale, self.inv_smooth, self.outliers, self.outlier_w]
        packed = (self.in_features + 4) * self.out_features if self.packed is not None else 0
        return packed + sum(t.numel() * t.element_size() for t in tensors)  # (+ fbgemm's column sums)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weights (smoothed, outlier columns zero) and their scales."""
        return (self.q, self.scale) if self.q.numel() else unpack(self.packed)

    def dequantized(self) -> torch.Tensor:
        """The float weights [out, in] the layer stands for (its values were it not rounding the
        activations): int8 values over the smoothing factors, float outlier columns."""
        q, scale = self.int8()
        w = q.to(self.scale.device).float() * scale[:, None] * self.inv_smooth
        w[:, self.outliers] = self.outlier_w.t()
        return w

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``index``'s output for ``x`` [rows, in]: the stacked matmul runs once for the
        parts that read the same input, one after the other (a model reads q, k and v of the same
        hidden states without writing to them in between)."""
        if len(self.bounds) == 1:
            return self(x)
        version = 0 if x.is_inference() else x._version  # (inference tensors keep no counter)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), version, x.device)
        last = self._last
        if last is None or last[0] != key or index in last[4]:
            last = self._last = (key, x, *self._unscaled(x), set())
        last[4].add(index)
        if len(last[4]) == len(self.bounds):
            self._last = None
        lo, hi = self.bounds[index]
        return torch.mul(last[2][:, lo:hi], last[3])  # (scaled back into a tensor of its own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, amax = self._unscaled(x)
        return y.mul_(amax)

    def _unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output divided by each row's scale, and the scales [rows, 1]."""
        x32 = x.float()
        cpu = self.packed is not None and x.device.type == "cpu"
        unit = torch.empty(x32.shape[0] + 1, x32.shape[1], device=x.device)  # (+ fbgemm's guard row)
        body = unit[:-1]
        torch.mul(x32, self.inv_smooth, out=body)
        amax = body.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # (faster than aminmax)
        body.div_(amax)
        if cpu:
            unit[-1:] = self.guard
            y = torch.ops.quantized.linear_dynamic(unit, self.packed, self.levels < 255)[:-1]
        else:  # the same grid, then PyTorch's int8 weight kernel
            step = torch.tensor(2 / self.levels, dtype=torch.float32)
            zero = (self.levels + 1) // 2
            snapped = body.div_(step).round_().clamp_(-zero, self.levels - zero).mul_(step)
            y = torch.ops.aten._weight_int8pack_mm(snapped, self.q, self.scale)
        if self.outliers.numel():
            y = y.addmm_(x32.index_select(1, self.outliers).div_(amax), self.outlier_w)
        return y, amax


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
    """A frozen ``nn.Linear`` whose forward is the w8a8 matmul; ``weight`` holds the float values
    it stands for (what the gradient flows through)."""

    def __init__(self, kernel: Kernel, bias: torch.Tensor | None, index: int = 0) -> None:
        lo, hi = kernel.bounds[index]
        super().__init__(kernel.in_features, hi - lo, bias=bias is not None, device="meta")
        self.weight = nn.Parameter(kernel.dequantized()[lo:hi], requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel, self.index = kernel, index

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.part(self.index, x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x, self.weight, self)
