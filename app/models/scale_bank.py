"""Per-slot elementwise scales of a wrapped layer, for the adapters that rescale a frozen layer
rather than add to it, each row its own:

- IA³ (PEFT ``IA3Config``): a learned vector scales a feed-forward layer's input (``in``) or another
  layer's output, bias included (``out``);
- DoRA (PEFT ``use_dora``): with a frozen base, ``m / ||W0 + s·B·A||_row`` is one constant vector
  ``g`` per layer, and the layer computes ``g ⊙ (W0 x + s·B·A x) + bias``: its LoRA output (bias
  included) scaled by ``g`` (``out``) plus ``(1 - g) ⊙ bias`` (``shift``).

Banks ``in`` [slots, in], ``out`` [slots, out] and ``shift`` [slots, out] are made when an adapter
needs them; the slots of other adapters (and slot 0, the bare base) hold ones and zeros, so their
rows are unchanged. Only the rows' own slots are gathered: one multiply (and add) per layer.
"""

from __future__ import annotations

import torch

from app.models.routing import Routing


class ScaleBank:
    """The scales of all resident adapters at one layer (engine thread only)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        self.sizes = {"in": in_features, "out": out_features, "shift": out_features}
        self.device, self.dtype = device, dtype
        self.banks: dict[str, torch.Tensor] = {}  # "in" / "out" / "shift" -> [room, features]
        self.uses: dict[int, frozenset[str]] = {}  # slot -> the banks it has values in

    def __bool__(self) -> bool:
        return bool(self.uses)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.banks.values())

    def _rows(self, name: str, routing: Routing) -> torch.Tensor | None:
        """Each row's vector of bank ``name`` [batch, 1, features] (or [features] for one slot);
        None when no row of this batch has one."""
        bank = self.banks.get(name)
        if bank is None or not any(name in self.uses.get(s, ()) for s in set(routing.slots)):
            return None
        if routing.single is not None:
            return bank[routing.single]
        assert routing.index is not None
        if bank.shape[0] <= routing.max_slot:  # rows of slots loaded after the bank was made
            self._grow(name, routing.max_slot + 1)
            bank = self.banks[name]
        return bank.index_select(0, routing.index).unsqueeze(1)

    def scale_input(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        scale = self._rows("in", routing)
        return x if scale is None else x * (scale if x.dim() == 3 or scale.dim() == 1 else scale[:, 0])

    def scale_output(self, out: torch.Tensor, routing: Routing) -> torch.Tensor:
        scale, shift = self._rows("out", routing), self._rows("shift", routing)
        if scale is not None:
            out = out * (scale if out.dim() == 3 or scale.dim() == 1 else scale[:, 0])
        if shift is not None:
            out = out + (shift if out.dim() == 3 or shift.dim() == 1 else shift[:, 0])
        return out

    # --- slots ------------------------------------------------------------------------------
    def set_slot(self, slot: int, vectors: dict[str, torch.Tensor], room: int) -> None:
        """Write ``vectors`` ("in", "out", "shift" -> [features]) into ``slot`` (banks grow to ``room``)."""
        self.clear_slot(slot)
        for name, vector in vectors.items():
            bank = self.banks.get(name)
            if bank is None or bank.shape[0] <= slot:
                self._grow(name, max(room, slot + 1))
            self.banks[name][slot].copy_(vector.reshape(-1))
        self.uses[slot] = frozenset(vectors)

    @torch.inference_mode(False)  # banks are normal tensors whatever the caller's mode: updated
    def _grow(self, name: str, room: int) -> None:  # in place later, read by attributions' backward
        fill = 0.0 if name == "shift" else 1.0
        bank = torch.full((room, self.sizes[name]), fill, dtype=self.dtype, device=self.device)
        old = self.banks.get(name)
        if old is not None:
            n = min(room, old.shape[0])
            bank[:n] = old[:n]
        self.banks[name] = bank

    def clear_slot(self, slot: int) -> None:
        for name in self.uses.pop(slot, ()):
            self.banks[name][slot].fill_(0.0 if name == "shift" else 1.0)
        for name in [n for n in self.banks if not any(n in u for u in self.uses.values())]:
            del self.banks[name]  # no adapter uses it any more

    def move_slot(self, src: int, dst: int) -> None:
        uses = self.uses.get(src)
        if uses is None:
            return
        vectors = {name: self.banks[name][src].clone() for name in uses}
        self.clear_slot(src)
        self.set_slot(dst, vectors, dst + 1)

    @torch.inference_mode(False)  # (see _grow)
    def fit(self, room: int) -> None:
        for name, bank in list(self.banks.items()):
            if bank.shape[0] > room:
                self.banks[name] = bank[:room].clone()
