"""The projections of a decoder layer as the lean step (app/models/one_row.py) calls them: each
base's kernel directly, the projections that read one input (q, k, v; gate, up) as a group with one
matmul where the packed weights allow, and their LoRA deltas in two matmuls for the whole group
(one adapter's, or every adapter of a mixed decode step side by side under a row mask)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from app import kernels
from app.models.multi_lora import MultiLoraLinear
from app.models.quantized_layers import QuantizedLinear


class Projection:
    """One projection of a layer: its module (a :class:`MultiLoraLinear` in the engine), and the
    base's matmul called directly where it is a plain one: float weights, or a format computing
    on bf16 rows (``rounds``: its input rounded once for the projections that read it)."""

    __slots__ = ("bias", "kernel", "lora", "module", "rounds")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.lora = module if isinstance(module, MultiLoraLinear) else None
        base = self.lora.base if self.lora is not None else module
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.bias: torch.Tensor | None = None
        self.rounds = False
        if isinstance(base, QuantizedLinear):
            self.kernel, self.bias = base.bf16_kernel(), base.bias
            self.rounds = self.kernel is not None
            if self.kernel is None:  # our int4 kernel: float rows, the bias added
                self.kernel, self.bias = base.float_kernel(), None
        elif type(base) is nn.Linear:
            weight, bias = base.weight, base.bias
            self.kernel = lambda x: F.linear(x, weight, bias)

    def general(self, slot: int | None) -> bool:
        """Whether this projection must run its module for adapter ``slot`` (no direct kernel,
        rows of several adapters: None, or IA³/DoRA scales or a bottleneck module of the slot's
        in this layer)."""
        if self.kernel is None or slot is None:
            return True
        lora = self.lora
        if lora is None:
            return False
        scales, bottleneck = lora.scales, lora.bottleneck
        return (scales is not None and slot in scales.uses) or (
            bottleneck is not None and slot in bottleneck.sizes
        )

    def __call__(
        self, x: torch.Tensor, x16: torch.Tensor | None, slot: int | None, rows: int
    ) -> torch.Tensor:
        """The projection of ``x`` [rows x n, in] (``x16``: the same in bf16 where it rounds) for
        adapter ``slot`` (the general path: the module, routed by the caller, on [rows, n, in])."""
        kernel = self.kernel
        if kernel is None or self.general(slot):
            out: torch.Tensor = self.module(x.view(rows, -1, x.shape[-1]))
            return out.view(x.shape[0], -1)
        if self.rounds:
            y = kernel(x.to(torch.bfloat16) if x16 is None else x16).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = kernel(x)
        assert slot is not None
        self.add_lora(x, y, slot)
        return y

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> None:
        """Add ``slot``'s LoRA delta of ``x`` to ``y`` [n, out] (a view is fine), in place."""
        lora = self.lora
        if lora is not None and slot in lora.loras:
            a_t, b_t, scale = lora.loras[slot]
            y.addmm_(torch.mm(x, a_t), b_t, alpha=scale)


class Group:
    """The projections of a layer that read the same input (q, k, v; gate, up; o; down). Where
    their bases are int8 or int4 on the packed CPU kernels, whose packing is one row of the
    weights after another, or int4 on our kernel (tiles of 16 outputs), their weights are laid
    end to end once (each layer's own weights become a view of that: no second copy) and one
    matmul computes them all; a LoRA adapter's deltas then take two matmuls for the group too (its
    A side by side, its B block-diagonal)."""

    __slots__ = ("bias", "bounds", "kernel", "lora", "mask", "mixed", "native", "parts", "rounds", "table")

    def __init__(self, modules: list[nn.Module]) -> None:
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.bias: torch.Tensor | None = None
        self.bounds: list[tuple[int, int]] = []
        # the whole group's weights on our int4 kernel (packed, scales, bias): one product computes
        # every part's output, side by side (app/models/native_step.py)
        self.native: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        if len(modules) > 1:
            fuse(self, modules)
        else:
            base = modules[0].base if isinstance(modules[0], MultiLoraLinear) else modules[0]
            if isinstance(base, QuantizedLinear) and base.native is not None:
                self.native = (base.packed, base.scales, base.bias)
                self.bounds = [(0, base.out_features)]
        self.parts = [Projection(m) for m in modules]  # (after fuse: the kernels read the views)
        self.rounds = self.parts[0].rounds
        # the last adapter's weights for the group: (its parts' A^T, as the layers keep them; A^T
        # side by side [in, ranks]; B^T block-diagonal [ranks, outs], each part's scaling folded in)
        self.lora: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        # a mixed batch's adapters for the whole group: (the parts' side-by-side A^T, as the layers
        # keep them; A^T [in, Σ ranks], B^T block-diagonal [Σ ranks, Σ outs]) and the last mask
        # (the parts' masks, as kept for the decode steps of one composition of rows; the mask)
        self.mixed: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self.mask: tuple[list[torch.Tensor], torch.Tensor] | None = None
        # where the rows' LoRA weights are for the native kernel, per decode batch composition
        self.table: tuple[tuple[int, tuple[int, ...]], kernels.LoraTable | None] | None = None

    def drop_batch_copies(self) -> None:
        """Free the weights of a mixed batch's adapters laid out for the group (see
        :meth:`MultiLoraLinear.drop_batch_copies`)."""
        self.mixed = self.mask = self.table = None

    def rows_plain(self, slots: set[int]) -> bool:
        """Whether the group's output for rows of adapters ``slots`` is the base's product plus
        each row's LoRA delta (:meth:`row_table`): no part needs its module for any."""
        return not any(p.general(s) for p in self.parts for s in slots)

    def row_table(self, rows: tuple[int, tuple[int, ...]]) -> kernels.LoraTable | None:
        """Where the LoRA weights of the rows are for the native kernel (None: no row has a delta
        in this group): ``rows`` = (the slots' ``generation``, :class:`RoutingContext`; each row's
        slot); kept while the rows' slots and the slots' weights stay."""
        kept = self.table
        if kept is None or (kept[0] is not rows and kept[0] != rows):
            loras = [p.lora for p in self.parts]
            weights = [[None if m is None else m.native_weights(s) for m in loras] for s in rows[1]]
            table = kernels.LoraTable.of(weights, self.bounds) if any(w for r in weights for w in r) else None
            kept = self.table = (rows, table)
        return kept[1]

    def __call__(self, x: torch.Tensor, slot: int | None, rows: int) -> list[torch.Tensor]:
        """Each projection of ``x`` [rows x n, in] for adapter ``slot`` (None: the rows' own)."""
        parts = self.parts
        if self.kernel is not None and slot is not None and not any(p.general(slot) for p in parts):
            y = self.kernel(x.to(torch.bfloat16)).to(x.dtype) if self.rounds else self.kernel(x)
            if self.bias is not None:
                y = y + self.bias
            weights = self._lora(slot)
            if weights is not None:
                y.addmm_(torch.mm(x, weights[0]), weights[1])
            return [y[:, a:b] for a, b in self.bounds]
        x16 = x.to(torch.bfloat16) if self.rounds else None
        if slot is None and x.shape[0] == rows:
            mixed = self._mixed(x, x16)
            if mixed is not None:
                return mixed
        return [part(x, x16, slot, rows) for part in parts]

    def _mixed(self, x: torch.Tensor, x16: torch.Tensor | None) -> list[torch.Tensor] | None:
        """A decode step of rows of several adapters (one token a row): each base's kernel on the
        rows, and the adapters' LoRA deltas of the whole group in two matmuls and a row mask (the
        batch's adapters side by side, as :meth:`MultiLoraLinear.concatenated` lays them for one
        layer); None where a part needs its module (no direct kernel, IA³/DoRA scales, bottleneck
        modules, or more adapters than run side by side)."""
        parts = self.parts
        if not self._mixable():
            return None
        ys = []
        for part in parts:
            assert part.kernel is not None
            if part.rounds:
                y = part.kernel(x16 if x16 is not None else x.to(torch.bfloat16)).to(x.dtype)
                ys.append(y if part.bias is None else y + part.bias)
            else:
                ys.append(part.kernel(x))
        deltas = self._mixed_deltas(x, [y.shape[1] for y in ys])
        if deltas is not None:
            start = 0
            for i in deltas[1]:
                width = ys[i].shape[1]
                ys[i] = ys[i] + deltas[0][:, start : start + width]
                start += width
        return ys

    def _mixable(self) -> bool:
        """Whether the routed rows (several adapters) take each base's kernel and their LoRA
        deltas side by side: no part needs its module, the adapters' ranks concatenate."""
        parts = self.parts
        lora = parts[0].lora
        routing = lora.ctx.routing if lora is not None else None
        if routing is None:
            return False
        used = set(routing.slots)
        for part in parts:
            if part.kernel is None or any(part.general(s) for s in used):
                return False
            lora = part.lora
            if lora is not None and not used.isdisjoint(lora.loras) and not lora.concatenates(routing):
                return False
        return True

    def _mixed_deltas(self, x: torch.Tensor, widths: list[int]) -> tuple[torch.Tensor, list[int]] | None:
        """The routed rows' LoRA deltas of ``x`` for the parts (of outputs ``widths``) that have
        any, side by side, and those parts' indices (None: no part has a delta for these rows)."""
        routing = self.parts[0].lora.ctx.routing if self.parts[0].lora is not None else None
        assert routing is not None
        used = set(routing.slots)
        with_lora = [
            (part.lora.concatenated(routing), i)
            for i, part in enumerate(self.parts)
            if part.lora is not None and not used.isdisjoint(part.lora.loras)
        ]
        if not with_lora:
            return None
        a_side, b_block = self._mixed_weights([w for w, _ in with_lora], [widths[i] for _, i in with_lora])
        masks = [w[2] for w, _ in with_lora]
        kept = self.mask
        if kept is None or len(kept[0]) != len(masks) or any(a is not b for a, b in zip(kept[0], masks)):  # noqa: B905
            kept = self.mask = (masks, torch.cat([m.view(m.shape[0], -1) for m in masks], dim=1))
        return torch.mm(torch.mm(x, a_side).mul_(kept[1]), b_block), [i for _, i in with_lora]

    def _mixed_weights(
        self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], widths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts' side-by-side A^T laid side by side, their B^T block-diagonal; remade when a
        part's own copies change."""
        kept = self.mixed
        if (
            kept is not None
            and len(kept[0]) == len(weights)
            and all(a is w[0] for a, w in zip(kept[0], weights, strict=True))
        ):
            return kept[1], kept[2]
        a_side = torch.cat([a_t for a_t, _, _ in weights], dim=1)
        b_block = a_side.new_zeros(a_side.shape[1], sum(widths))
        row = col = 0
        for (_, b_t, _), width in zip(weights, widths, strict=True):
            b_block[row : row + b_t.shape[0], col : col + width] = b_t
            row, col = row + b_t.shape[0], col + width
        self.mixed = ([a_t for a_t, _, _ in weights], a_side, b_block)
        return a_side, b_block

    def _lora(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``slot``'s LoRA weights for the whole group (None: no part has any), remade when the
        layers' own copies change (another adapter, or new weights in the slot)."""
        pairs = [
            (part.lora.loras[slot], bounds)
            for part, bounds in zip(self.parts, self.bounds, strict=True)
            if part.lora is not None and slot in part.lora.loras
        ]
        if not pairs:
            return None
        kept = self.lora
        if (
            kept is not None
            and len(kept[0]) == len(pairs)
            and all(a is b for a, b in zip(kept[0], (p[0][0] for p in pairs), strict=True))
        ):
            return kept[1], kept[2]
        a_side = torch.cat([a_t for (a_t, _, _), _ in pairs], dim=1)
        b_block = a_side.new_zeros(a_side.shape[1], self.bounds[-1][1])
        row = 0
        for (_, b_t, scale), (start, end) in pairs:
            b_block[row : row + b_t.shape[0], start:end] = b_t * scale
            row += b_t.shape[0]
        self.lora = ([a_t for (a_t, _, _), _ in pairs], a_side, b_block)
        return a_side, b_block


def fuse(group: Group, modules: list[nn.Module]) -> None:
    """Lay the packed weights of ``modules``' bases end to end, when they allow it (see
    :class:`Group`), checked on a random input against the separate matmuls."""
    bases = [m.base if isinstance(m, MultiLoraLinear) else m for m in modules]
    layers = [b for b in bases if isinstance(b, QuantizedLinear)]
    if len(layers) != len(bases) or len({(b.kind, b.in_features, b.native) for b in layers}) != 1:
        return
    first = layers[0]
    native = first.native
    if native is None and not (first.cpu_kernel and first.kind in ("int8", "int4")):
        return
    packed = torch.cat([b.packed for b in layers])
    one_dim = native is not None or first.kind == "int8"  # (tinygemm's int4 scales: [groups, out, 2])
    scales = torch.cat([b.scales for b in layers], dim=0 if one_dim else 1).contiguous()
    fused = QuantizedLinear(
        first.in_features,
        sum(b.out_features for b in layers),
        first.kind,
        packed,
        scales,
        None,
        first.compute_dtype,
        cpu_kernel=native is None,
        native=native,
    )
    if native is not None:
        kernel = fused.float_kernel()
        matmul = native.matmul
        parts: list[Callable[[torch.Tensor], torch.Tensor] | None] = [
            functools.partial(matmul, packed=b.packed, scales=b.scales, bias=None) for b in layers
        ]
        probe = torch.randn(1, first.in_features, device=packed.device)
    else:
        kernel, parts = fused.bf16_kernel(), [b.bf16_kernel() for b in layers]
        probe = torch.randn(1, first.in_features, dtype=torch.bfloat16, device=packed.device)
    assert kernel is not None
    separate = torch.cat([part(probe) for part in parts if part is not None], dim=1)
    if not torch.equal(kernel(probe), separate):
        return
    start, row = 0, 0
    for b in layers:
        rows = b.packed.shape[0]
        b.packed = packed[row : row + rows]  # the layer's own weights: a view of the whole
        if native is not None:
            b.scales = scales[row : row + rows]
        group.bounds.append((start, start + b.out_features))
        start, row = start + b.out_features, row + rows
    group.kernel = kernel
    if any(b.bias is not None for b in layers):
        group.bias = torch.cat(
            [
                b.bias if b.bias is not None else packed.new_zeros(b.out_features, dtype=b.compute_dtype)
                for b in layers
            ]
        )
    if native is not None:
        group.native = (packed, scales, None if group.bias is None else group.bias.float().contiguous())
