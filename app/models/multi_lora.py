"""Multi-adapter LoRA layers: each row of a batch gets the delta of its own adapter slot.

Every targeted ``nn.Linear`` of the base is wrapped once by :class:`MultiLoraLinear`. Each resident
adapter's weights for the layer are kept per slot as A^T [in, r] and B^T [r, out], contiguous (the
layouts the matmuls read), with the adapter's scaling. Where the device and dtype are the adapter's
own (a CPU computing in the file's dtype) these are the host tier's tensors themselves, which
:func:`app.adapters.lora_format.host_layout` lays out so: an adapter is held once in memory, not
once per tier; elsewhere (a GPU, another dtype) the slot holds a converted copy. Slot 0 is the bare
base (no weights). The per-batch routing (slot of each row) is set once per forward on a shared
:class:`Routing` object, so no layer needs a host sync to find its rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from app import kernels
from app.models.bottleneck_bank import BottleneckBank
from app.models.quantized_layers import QuantizedLinear
from app.models.routing import BASE_SLOT, Routing, RoutingContext
from app.models.scale_bank import ScaleBank

# a mixed batch whose adapters' ranks add up to at most this runs them side by side as one LoRA
# (two GEMMs and a row mask) instead of gathering each row's weights (BGMV style): on 2 CPU cores,
# 33 decode rows of rank-16 adapters on a 576x1536 layer, with the base GEMM, 345 against 406 µs
# for 2 adapters, 367 against 427 for 4; 8 is a toss-up between runs, 16 clearly slower (500
# against 385; bench/lora_paths.py)
CONCAT_MAX_RANK = 64

LoraWeights = tuple[torch.Tensor, torch.Tensor, float]  # A^T [in, r], B^T [r, out], scaling

__all__ = [
    "BASE_SLOT",
    "MultiLoraLinear",
    "Routing",
    "RoutingContext",
    "wrap_linear_layers",
]


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``, the same map with its weight stored [in, out],
    or a :class:`QuantizedLinear` of a quantized base) plus, per row, the LoRA delta of its slot and
    the bottleneck module of its slot applied to the output (a row's adapter has one kind)."""

    _dtype: torch.dtype
    _device: torch.device

    def __init__(self, base: nn.Linear | Conv1D | QuantizedLinear, ctx: RoutingContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        if isinstance(base, Conv1D):
            self._in, self._out = int(base.weight.shape[0]), int(base.weight.shape[1])
        else:
            self._in, self._out = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            self._dtype, self._device = base.compute_dtype, base.packed.device
        else:
            self._dtype, self._device = base.weight.dtype, base.weight.device
        self.loras: dict[int, LoraWeights] = {}  # slot -> its adapter's weights in this layer
        # an int4 base on the native kernels: each slot's weights in 8 (or LORA_BITS=4) bits too, as
        # the native decode step reads them (app/models/native_step.py; a quarter of the bytes)
        self.int8 = isinstance(base, QuantizedLinear) and base.native is not None
        self.loras8: dict[int, kernels.Lora8 | kernels.Lora4] = {}
        self.bottleneck: BottleneckBank | None = None  # bottleneck modules following this layer
        self.scales: ScaleBank | None = None  # IA³ and DoRA scales (app/models/scale_bank.py)
        # the weights gathered for the running decode batch: per row (key, A^T [batch, in, r],
        # B^T·s [batch, r, out]), or side by side (-key - 1, A^T, B^T·s, mask; :meth:`concatenated`)
        self._gathered: (
            tuple[int, torch.Tensor, torch.Tensor]
            | tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]
            | None
        ) = None
        # the weights of a set of adapters side by side: (their slots, A^T, B^T·s, each rank's slot)
        self._side_by_side: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.ctx.routing
        if routing is None:
            return self.base(x)
        scales = self.scales
        if scales is not None:
            x = scales.scale_input(x, routing)
        if not self.loras or self.loras.keys().isdisjoint(routing.slots):
            out = self.base(x)
        else:
            out = self._with_lora(x, routing)
        if scales is not None:
            out = scales.scale_output(out, routing)
        if self.bottleneck:
            self.bottleneck.apply(out, routing)
        return out

    def _with_lora(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Base output plus each row's LoRA delta. The deltas come first (over the broadcast bias)
        and the base GEMM accumulates into them in place (addmm, beta=1): adding the deltas after
        the base would cost one more pass over the output."""
        width = x.shape[-1]
        # a quantized base's kernel adds its bias itself
        bias = None if isinstance(self.base, QuantizedLinear) else self.base.bias
        flat = x.reshape(-1, width)
        rows = x.shape[0]
        if routing.single is not None:
            a_t, b_t, scale = self.loras[routing.single]
            h = torch.mm(flat, a_t).mul_(scale)  # [tokens, r]
            out = torch.mm(h, b_t) if bias is None else torch.addmm(bias, h, b_t)
        elif self.concatenates(routing):
            a_t, b_cat, mask = self.concatenated(routing)
            h = torch.mm(flat, a_t).view(rows, -1, a_t.shape[1]).mul_(mask)
            h = h.view(-1, a_t.shape[1])
            out = torch.mm(h, b_cat) if bias is None else torch.addmm(bias, h, b_cat)
        else:
            a_t, b_t = self._per_row_weights(routing)
            h = torch.bmm(flat.view(rows, -1, width), a_t)  # [batch, tokens, r]
            if bias is None:
                out = torch.bmm(h, b_t)
            else:
                out = torch.baddbmm(bias.expand(rows, h.shape[1], self._out), h, b_t)
        base = self.base
        if isinstance(base, QuantizedLinear):  # its kernel writes a new output: add the deltas to it
            out = base(flat).add_(out.view(-1, self._out))
        else:  # Conv1D stores its weight [in, out], Linear [out, in]
            weight = base.weight if isinstance(base, Conv1D) else base.weight.t()
            out = out.view(-1, self._out).addmm_(flat, weight)
        return out.view(*x.shape[:-1], self._out)

    def concatenates(self, routing: Routing) -> bool:
        """Whether the few adapters of a mixed batch run as one LoRA of their ranks side by side."""
        loras = self.loras
        total = sum(loras[slot][0].shape[1] for slot in set(routing.slots) if slot in loras)
        return 0 < total <= CONCAT_MAX_RANK

    def concatenated(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's adapters side by side: A^T [in, Σr], B^T [Σr, out] (each adapter's scaling
        folded in), and each row's mask [batch, 1, Σr] (1 over its own adapter's ranks). The
        weights are kept while the batch's set of adapters stays (rows of a running batch join and
        leave every few steps), the mask across the decode steps of one composition of rows; only
        in inference mode (a tensor made there cannot take part in a backward pass, as
        attributions run)."""
        key = routing.reuse_key
        gathered = self._gathered
        if key is not None and gathered is not None and gathered[0] == -key - 1:
            return gathered[1], gathered[2], gathered[3]  # type: ignore[misc]
        slots = tuple(sorted(s for s in set(routing.slots) if s in self.loras))
        weights, inference = self._side_by_side, torch.is_inference_mode_enabled()
        if not inference or weights is None or weights[0] != slots:
            parts = [self.loras[s] for s in slots]
            a_t = torch.cat([a for a, _, _ in parts], dim=1)
            b_cat = torch.cat([b * scale for _, b, scale in parts])
            owner = torch.tensor(
                [s for s, (a, _, _) in zip(slots, parts, strict=True) for _ in range(a.shape[1])],
                dtype=torch.long,
                device=a_t.device,
            )
            weights = (slots, a_t, b_cat, owner)
            if inference:
                self._side_by_side = weights
        _, a_t, b_cat, owner = weights
        rows = torch.tensor(routing.slots, dtype=torch.long, device=a_t.device)
        mask = (rows.view(-1, 1, 1) == owner.view(1, 1, -1)).to(a_t.dtype)
        if key is not None:
            self._gathered = (-key - 1, a_t, b_cat, mask)
        return a_t, b_cat, mask

    def _per_row_weights(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A^T [batch, in, r] and B^T [batch, r, out] with its scaling folded in (smaller
        ranks zero-padded, rows without weights here zero); for a decode batch gathered once per
        composition of its rows and kept across its steps. (Running each run of one adapter's rows
        on its own weights instead, without copies, measured 5 % slower for a prefill of 16 rows
        of 16 adapters: 715 against 678 ms.)"""
        key = routing.reuse_key
        if key is not None and self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1], self._gathered[2]
        loras = self.loras
        distinct = set(routing.slots)
        rank = max(loras[s][0].shape[1] for s in distinct if s in loras)
        padded: dict[int, LoraWeights] = {}
        for slot in distinct:
            if slot not in loras:
                zero = torch.zeros(rank, self._out, dtype=self._dtype, device=self._device)
                padded[slot] = (zero.new_zeros(self._in, rank), zero, 0.0)
                continue
            a_t, b_t, scale = loras[slot]
            pad = rank - a_t.shape[1]
            padded[slot] = (F.pad(a_t, (0, pad)), F.pad(b_t, (0, 0, 0, pad)), scale) if pad else loras[slot]
        rows = [padded[s] for s in routing.slots]
        a = torch.stack([w[0] for w in rows])
        b = torch.stack([w[1] for w in rows])
        b.mul_(torch.tensor([w[2] for w in rows], dtype=self._dtype, device=self._device).view(-1, 1, 1))
        if key is not None:
            self._gathered = (key, a, b)
        return a, b

    # --- slot management (engine thread only, between forwards) -------------------------------
    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Hold an adapter's A [r, in] and B [out, r] in ``slot``: the tensors themselves where
        their transposes are contiguous on this layer's device and dtype, else converted copies."""
        device, dtype = self._device, self._dtype
        self.loras[slot] = (_held(a.t(), device, dtype), _held(b.t(), device, dtype), scale)
        if self.int8 and kernels.fits8(a.shape[1], a.shape[0]):
            quantize = kernels.quantize_lora4 if self.ctx.lora_bits == 4 else kernels.quantize_lora
            self.loras8[slot] = quantize(*self.loras[slot])
        self._forget_gathered()
        self.ctx.generation += 1

    def native_weights(self, slot: int) -> kernels.LoraWeights | None:
        """``slot``'s weights as the native kernel reads them (8 or 4 bits where kept so), or None."""
        weights = self.loras8.get(slot)
        if weights is not None:
            return weights
        return self.loras.get(slot)

    def drop_batch_copies(self) -> bool:
        """Free the copies made for a batch of several adapters (the rows' gathered weights, the
        adapters side by side), kept across its decode steps. True when there were any."""
        dropped = self._gathered is not None or self._side_by_side is not None
        if dropped:  # (nn.Module attribute writes are slow: an idle engine runs this for every layer)
            self._gathered = self._side_by_side = None
        if self.bottleneck is not None:
            dropped = self.bottleneck.drop_batch_copies() or dropped
        return dropped

    def _forget_gathered(self) -> None:
        if self._gathered is not None:  # (nn.Module attribute writes are slow; skip the no-ops)
            self._gathered = None
        if self._side_by_side is not None:
            self._side_by_side = None

    @property
    def nbytes(self) -> int:
        total = self.bottleneck.nbytes if self.bottleneck is not None else 0
        total += self.scales.nbytes if self.scales is not None else 0
        total += sum(w.nbytes for w in self.loras8.values())
        return total + sum(a.nbytes + b.nbytes for a, b, _ in self.loras.values())

    def set_bottleneck(
        self,
        slot: int,
        weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        activation: str,
        scale: float,
        max_slots: int,
    ) -> None:
        """Write one bottleneck module that follows this layer's output into ``slot``."""
        if self.bottleneck is None:
            self.bottleneck = BottleneckBank(self.out_features, self._device, self._dtype)
        room = _grown(self.bottleneck.down.shape[0], slot, max_slots)
        self.bottleneck.set_slot(slot, weights, activation, scale, room)

    def set_scales(self, slot: int, vectors: dict[str, torch.Tensor], max_slots: int) -> None:
        """Write an IA³ or DoRA adapter's vectors ("in", "out", "shift") into ``slot``."""
        if self.scales is None:
            self.scales = ScaleBank(self.in_features, self.out_features, self._device, self._dtype)
        room = _grown(max((b.shape[0] for b in self.scales.banks.values()), default=0), slot, max_slots)
        self.scales.set_slot(slot, {k: v.to(self._device, self._dtype) for k, v in vectors.items()}, room)

    @torch.no_grad()
    def dora_vectors(
        self, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """DoRA's constant scale over this frozen layer, ``g = m / ||W0 + s·B·A||_row`` ("out"), and
        the bias correction ``(1 - g) ⊙ bias`` ("shift"), from the weights this layer computes with."""
        base = self.base
        if isinstance(base, QuantizedLinear):
            w0 = base.dequantized().float()
        else:  # Conv1D stores its weight [in, out]
            w0 = (base.weight.t() if isinstance(base, Conv1D) else base.weight).float()
        lora = b.to(w0.device, torch.float32) @ a.to(w0.device, torch.float32)
        g = magnitude.to(w0.device, torch.float32) / torch.linalg.norm(w0 + scale * lora, dim=1)
        vectors = {"out": g}
        if base.bias is not None:
            vectors["shift"] = (1 - g) * base.bias.float()
        return vectors

    def clear_slot(self, slot: int) -> None:
        """Drop ``slot``'s weights (a referenced host tensor stays while the host tier holds it)."""
        if self.scales is not None:
            self.scales.clear_slot(slot)
            if not self.scales:
                self.scales = None
        if self.bottleneck is not None:
            self.bottleneck.clear_slot(slot)
            if not self.bottleneck:
                self.bottleneck = None  # free the bank when no adapter uses it
        self.loras8.pop(slot, None)
        if self.loras.pop(slot, None) is not None:
            self._forget_gathered()
            self.ctx.generation += 1

    def move_slot(self, src: int, dst: int) -> None:
        """Move the weights of slot ``src`` to the free slot ``dst`` (compaction)."""
        if self.scales is not None:
            self.scales.move_slot(src, dst)
        if self.bottleneck is not None:
            self.bottleneck.move_slot(src, dst)
        quantized = self.loras8.pop(src, None)
        if quantized is not None:
            self.loras8[dst] = quantized
        weights = self.loras.pop(src, None)
        if weights is not None:
            self.loras[dst] = weights
            self._forget_gathered()
            self.ctx.generation += 1

    def fit(self) -> None:
        """Shrink the stacked banks (scales, bottleneck modules) to the slots still in use."""
        if self.scales is not None:
            self.scales.fit(_round_up(max(self.scales.uses) + 1))
        if self.bottleneck is not None:
            self.bottleneck.fit(_round_up(max(self.bottleneck.sizes) + 1))


def _held(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself where it is contiguous on ``device`` in ``dtype`` and may take part in a
    backward pass (attributions), else such a copy."""
    if t.device == device and t.dtype == dtype and t.is_contiguous() and not t.is_inference():
        return t
    with torch.inference_mode(False):
        held = torch.empty(t.shape, dtype=dtype, device=device)
        held.copy_(t)
    return held


_SLOT_CHUNK = 4


def _round_up(slots: int) -> int:
    return -(-slots // _SLOT_CHUNK) * _SLOT_CHUNK


def _grown(current: int, slot: int, max_slots: int) -> int:
    """Room of a bank that must hold ``slot``: at least half again its current room (a growth copies
    every resident adapter, so loading n adapters one by one copies O(n) adapters, not O(n^2)),
    in chunks of a few slots, never above ``max_slots``."""
    return max(current, min(max_slots, max(_round_up(slot + 1), _round_up(current * 3 // 2))))


def wrap_linear_layers(model: nn.Module, ctx: RoutingContext) -> dict[str, MultiLoraLinear]:
    """Replace every ``nn.Linear`` (and ``Conv1D``, :class:`QuantizedLinear`) of ``model`` by a
    :class:`MultiLoraLinear`.

    A model wrapped before (by an earlier engine on the same base) is taken over: its layers get
    the new routing context and empty banks.
    """
    wrapped: dict[str, MultiLoraLinear] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MultiLoraLinear):
            mod.ctx = ctx
            mod.loras, mod.loras8 = {}, {}
            mod.bottleneck = None
            mod._forget_gathered()
            wrapped[name] = mod
        elif isinstance(mod, nn.Linear | Conv1D | QuantizedLinear) and name and not name.endswith(".base"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MultiLoraLinear(mod, ctx)
            setattr(parent, child, layer)
            wrapped[name] = layer
    return wrapped
