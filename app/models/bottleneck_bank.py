"""Per-slot bottleneck modules applied to a wrapped layer's output, for every row its own adapter.

The resident bottleneck adapters of one layer live in stacked banks:

    down: [slots, size_max, features]   down_b: [slots, size_max]
    up:   [slots, features, size_max]   up_b:   [slots, features]      (scaling folded into up)

Slot 0 and the slots of other adapter kinds are zero: ``act(0) = 0`` for every supported
activation, so their rows get exactly nothing added. Smaller sizes are zero-padded (exact zeros).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from app.models.routing import Routing

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
}


class BottleneckBank:
    """The bottleneck modules of all resident adapters at one layer output (engine thread only)."""

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype) -> None:
        self.features = features
        self.device = device
        self.dtype = dtype
        self.down = torch.empty(0, 0, features, dtype=dtype, device=device)
        self.down_b = torch.empty(0, 0, dtype=dtype, device=device)
        self.up = torch.empty(0, features, 0, dtype=dtype, device=device)
        self.up_b = torch.empty(0, features, dtype=dtype, device=device)
        self.sizes: dict[int, int] = {}  # slot -> bottleneck size, for the slots with a module here
        self.acts: dict[int, str] = {}  # slot -> activation name
        self._gathered: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def __bool__(self) -> bool:
        return bool(self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.down_b, self.up, self.up_b))

    # --- forward ----------------------------------------------------------------------------
    def apply(self, out: torch.Tensor, routing: Routing) -> None:
        """Add each row's ``up(act(down(out)))`` to ``out`` [batch, tokens, features] in place."""
        if routing.single is not None:
            self._apply_slot(out, routing.single)
            return
        if self.sizes.keys().isdisjoint(routing.slots):
            return
        rows = out.shape[0]
        down_t, down_b, up_t, up_b = self._per_row(routing)
        y = out.view(rows, -1, self.features)
        z = torch.baddbmm(down_b, y, down_t)  # [batch, tokens, size]
        y.baddbmm_(self._activate(z, routing), up_t).add_(up_b)

    def _apply_slot(self, out: torch.Tensor, slot: int) -> None:
        """Add slot ``slot``'s module output to every row of ``out`` (contiguous) in place."""
        size = self.sizes.get(slot)
        if size is None:
            return
        flat = out.view(-1, self.features)
        z = nn.functional.linear(flat, self.down[slot, :size], self.down_b[slot, :size])
        flat.addmm_(ACTIVATION_FNS[self.acts[slot]](z), self.up[slot, :, :size].t())
        flat.add_(self.up_b[slot])

    def _activate(self, z: torch.Tensor, routing: Routing) -> torch.Tensor:
        acts = {self.acts[s] for s in routing.slots if s in self.acts}
        if len(acts) == 1:  # the usual case: one function for every row (zero rows stay zero)
            return ACTIVATION_FNS[acts.pop()](z)
        result = torch.zeros_like(z)
        for name in sorted(acts):
            rows = [i for i, s in enumerate(routing.slots) if self.acts.get(s) == name]
            index = torch.tensor(rows, device=z.device)
            result.index_copy_(0, index, ACTIVATION_FNS[name](z.index_select(0, index)))
        return result

    def _per_row(self, routing: Routing) -> tuple[torch.Tensor, ...]:
        """Each row's down^T [batch, features, size], down bias [batch, 1, size], up^T [batch, size,
        features] and up bias [batch, 1, features]; kept across the decode steps of one batch."""
        key = routing.reuse_key
        if key is not None and self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1]
        assert routing.index is not None
        index = routing.index
        if routing.max_slot >= self.down.shape[0]:  # slots beyond this bank have no module here
            index = torch.where(index < self.down.shape[0], index, 0)
        weights: tuple[torch.Tensor, ...] = (
            self.down.index_select(0, index).transpose(1, 2),
            self.down_b.index_select(0, index).unsqueeze(1),
            self.up.index_select(0, index).transpose(1, 2),
            self.up_b.index_select(0, index).unsqueeze(1),
        )
        if key is not None:  # decode reads these every step: contiguous copies are faster
            weights = tuple(w.contiguous() for w in weights)
            self._gathered = (key, weights)
        return weights

    def drop_batch_copies(self) -> bool:
        """Free the rows' gathered weights of the last batch (True when there were any)."""
        dropped, self._gathered = self._gathered is not None, None
        return dropped

    # --- bank management (between forwards) ------------------------------------------------
    @torch.inference_mode(False)  # banks are normal tensors whatever the caller's mode (updated
    def _resize(self, slots: int, size: int) -> None:  # in place, read by attributions' backward)
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        f = self.features
        down, down_b, up, up_b = (
            zeros(slots, size, f),
            zeros(slots, size),
            zeros(slots, f, size),
            zeros(slots, f),
        )
        n, m = min(slots, self.down.shape[0]), min(size, self.down.shape[1])
        down[:n, :m], down_b[:n, :m] = self.down[:n, :m], self.down_b[:n, :m]
        up[:n, :, :m], up_b[:n] = self.up[:n, :, :m], self.up_b[:n]
        self.down, self.down_b, self.up, self.up_b = down, down_b, up, up_b
        self._gathered = None

    def set_slot(
        self,
        slot: int,
        weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        activation: str,
        scale: float,
        slots: int,
    ) -> None:
        """Write one module (down [size, f], down bias, up [f, size], up bias; any device and float
        dtype) into ``slot``, the scaling folded into ``up`` on the way; ``slots``: the bank's room."""
        down, down_b, up, up_b = weights
        size = down.shape[0]
        if slot >= self.down.shape[0] or size > self.down.shape[1]:
            self._resize(max(slots, self.down.shape[0]), max(size, self.down.shape[1]))
        self.clear_slot(slot)
        self.down[slot, :size].copy_(down)
        self.down_b[slot, :size].copy_(down_b)
        self.up[slot, :, :size].copy_(up)
        self.up[slot, :, :size].mul_(scale)
        self.up_b[slot].copy_(up_b)
        self.up_b[slot].mul_(scale)
        self.sizes[slot] = size
        self.acts[slot] = activation

    def clear_slot(self, slot: int) -> None:
        self._gathered = None
        size = self.sizes.pop(slot, None)
        self.acts.pop(slot, None)
        if size is not None:
            self.down[slot].zero_()
            self.down_b[slot].zero_()
            self.up[slot].zero_()
            self.up_b[slot].zero_()

    def move_slot(self, src: int, dst: int) -> None:
        size = self.sizes.get(src)
        if size is None:
            return
        act = self.acts[src]
        for t in (self.down, self.down_b, self.up, self.up_b):
            t[dst] = t[src]
        self.clear_slot(src)
        self.sizes[dst], self.acts[dst] = size, act

    def fit(self, slots: int) -> None:
        """Shrink to ``slots`` slots and the largest size in use (frees the memory)."""
        size = max(self.sizes.values(), default=0)
        if slots < self.down.shape[0] or size < self.down.shape[1]:
            self._resize(min(slots, self.down.shape[0]), size)
