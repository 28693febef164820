"""Device slots: which adapter versions are resident in the LoRA banks, with LRU eviction."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from app.adapters.registry import AdapterInfo
from app.models.lora import MultiLoraLinear

log = logging.getLogger(__name__)


class SlotsExhausted(Exception):
    """Every slot is held by the batch being formed."""


class DeviceSlots:
    """Maps adapter uids to slots ``1..capacity`` (slot 0 = bare base) of every wrapped layer."""

    def __init__(
        self, layers: dict[str, MultiLoraLinear], capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.layers = layers
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self._lru: OrderedDict[int, int] = OrderedDict()  # uid -> slot, least recently used first
        self._infos: dict[int, AdapterInfo] = {}
        self.heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # slot -> (W [L, H], b)

    def __contains__(self, uid: int) -> bool:
        return uid in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def _free_slot(self, keep: set[int]) -> int:
        used = set(self._lru.values())
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                return slot
        for uid in self._lru:
            if uid not in keep:
                slot = self._lru[uid]
                self.unload(uid)
                return slot
        raise SlotsExhausted(f"all {self.capacity} adapter slots are in use by this batch")

    def acquire(self, info: AdapterInfo, keep: set[int]) -> int:
        """Slot of ``info`` (loading it if needed, evicting an LRU adapter not in ``keep``)."""
        slot = self._lru.get(info.uid)
        if slot is not None:
            self._lru.move_to_end(info.uid)
            return slot
        slot = self._free_slot(keep)
        adapter = info.adapter
        for module, (a, b) in adapter.weights.items():
            self.layers[module].set_slot(
                slot, a.to(self.device, self.dtype), b.to(self.device, self.dtype), self.capacity + 1
            )
        if adapter.head_weight is not None:
            bias = adapter.head_bias.to(self.device, self.dtype) if adapter.head_bias is not None else None
            self.heads[slot] = (adapter.head_weight.to(self.device, self.dtype), bias)
        self._lru[info.uid] = slot
        self._infos[info.uid] = info
        info.tier = "device"
        log.debug("adapter %s v%d loaded into slot %d", info.name, info.version, slot)
        return slot

    def unload(self, uid: int) -> None:
        slot = self._lru.pop(uid, None)
        if slot is None:
            return
        info = self._infos.pop(uid)
        for module in info.adapter.weights:
            self.layers[module].clear_slot(slot)
        self.heads.pop(slot, None)
        info.tier = "host"
        log.debug("adapter %s v%d unloaded from slot %d", info.name, info.version, slot)
