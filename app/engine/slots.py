"""The device tier: which adapter versions are resident in the wrapped layers' slots, with LRU eviction.

Owned by the engine thread (its only writer). Capacity is a slot count and a byte budget (the
adapters' own bytes). An adapter that queued or running work needs (``keep``) or whose name is
pinned is never evicted; when nothing can be evicted, :meth:`DeviceSlots.acquire` raises
:class:`SlotsExhausted` and the work waits. Other threads read only :attr:`DeviceSlots.resident`,
a frozen set of uids replaced (never mutated) after each change. :meth:`compact` (called between
steps) moves adapters into the holes left by unloads and shrinks the stacked banks (bottleneck,
IA³, DoRA), so that unloading frees device memory for real; a LoRA slot holds its adapter's own
tensors (on a CPU the host tier's: app/models/multi_lora.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from app.adapters.bottleneck_format import BottleneckAdapter
from app.adapters.ia3_format import IA3Adapter
from app.adapters.kinds import Adapter
from app.adapters.version import AdapterVersion
from app.metrics import Metrics
from app.models.heads import Head, head_nbytes
from app.models.multi_lora import MultiLoraLinear

log = logging.getLogger(__name__)


class SlotsExhausted(Exception):
    """No slot or byte budget can be freed now: every resident adapter is in use or pinned."""


class DeviceSlots:
    """Maps adapter uids to slots ``1..capacity`` (slot 0 = bare base) of every wrapped layer."""

    def __init__(
        self,
        layers: dict[str, MultiLoraLinear],
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        byte_budget: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.layers = layers
        self.capacity = capacity
        self.byte_budget = byte_budget
        self.device = device
        self.dtype = dtype
        self.metrics = metrics or Metrics()
        self._lru: OrderedDict[int, int] = OrderedDict()  # uid -> slot, least recently used first
        self._versions: dict[int, AdapterVersion] = {}
        self.heads: dict[int, Head] = {}  # slot -> classification head layers on the device
        self.pinned: frozenset[str] = frozenset()  # adapter names whose resident versions stay
        self.resident: frozenset[int] = frozenset()  # uids, for other threads (replaced, not mutated)
        self._dirty = False  # an unload left a hole or slack for compact()

    def __contains__(self, uid: int) -> bool:
        return uid in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def resident_bytes(self) -> int:
        return sum(v.size_bytes for v in self._versions.values())

    @property
    def bank_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values()) + sum(
            head_nbytes(head) for head in self.heads.values()
        )

    def lru_order(self) -> list[AdapterVersion]:
        """Resident adapters, least recently used first."""
        return [self._versions[uid] for uid in self._lru]

    def slot_of(self, uid: int) -> int | None:
        return self._lru.get(uid)

    def acquire(
        self, info: AdapterVersion, weights: Adapter, keep: set[int], spare: frozenset[int] = frozenset()
    ) -> int:
        """Slot of ``info``, loading ``weights`` if needed.

        Evicts least recently used adapters, never one in ``keep`` (running rows, this batch) or a
        pinned one, and those in ``spare`` (wanted by queued requests) only when nothing else is left.
        """
        slot = self._lru.get(info.uid)
        if slot is not None:
            self._lru.move_to_end(info.uid)
            return slot
        size, budget = info.size_bytes, self.byte_budget
        count, total = len(self._lru), self.resident_bytes
        victims: list[int] = []  # planned first: a load that cannot fit must not evict anything
        candidates = [u for u in self._lru if u not in keep and self._versions[u].name not in self.pinned]
        candidates.sort(key=lambda u: u in spare)  # stable: LRU order within each group
        for uid in candidates:
            if count < self.capacity and (budget is None or total + size <= budget):
                break
            victims.append(uid)
            count, total = count - 1, total - self._versions[uid].size_bytes
        if count >= self.capacity or (budget is not None and total + size > budget):
            raise SlotsExhausted(
                f"no device room for adapter {info.name!r}: every resident adapter is in use or pinned"
            )
        slot = None
        for victim in victims:
            slot = slot or self._lru[victim]  # the first victim's slot is reused
            self.unload(victim)
            self.metrics.adapter_evictions.labels(tier="device").inc()
        return self._load(info, weights, slot)

    def _load(self, info: AdapterVersion, weights: Adapter, slot: int | None = None) -> int:
        start = time.perf_counter()
        if slot is None:
            used = set(self._lru.values())
            slot = next(s for s in range(1, self.capacity + 1) if s not in used)
        room = self.capacity + 1
        if isinstance(weights, BottleneckAdapter):
            for module, block in weights.blocks.items():
                self.layers[module].set_bottleneck(slot, block, weights.activation, weights.alpha, room)
        elif isinstance(weights, IA3Adapter):
            for module, (vector, feedforward) in weights.scales.items():
                self.layers[module].set_scales(slot, {"in" if feedforward else "out": vector}, room)
        else:
            for module, (a, b, scale) in weights.weights.items():
                self.layers[module].set_lora(slot, a, b, scale)
            for module, magnitude in weights.magnitudes.items():  # DoRA
                layer = self.layers[module]
                a, b, scale = weights.weights[module]
                layer.set_scales(slot, layer.dora_vectors(a, b, scale, magnitude), room)
        if weights.head:
            self.heads[slot] = tuple(layer.to(self.device, self.dtype) for layer in weights.head)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the load time below is the copy's, not the launch's
        self._lru[info.uid] = slot
        self._versions[info.uid] = info
        self.resident = frozenset(self._lru)
        m = self.metrics
        m.adapter_loads.labels(tier="device").inc()
        m.adapter_load_seconds.labels(tier="device").observe(time.perf_counter() - start)
        self._update_gauges()
        log.debug("adapter %s v%d loaded into slot %d", info.name, info.version, slot)
        return slot

    def unload(self, uid: int) -> None:
        """Free the slot of ``uid`` (the stacked banks of bottleneck, IA³ and DoRA vectors shrink at
        the next :meth:`compact`)."""
        slot = self._lru.pop(uid, None)
        if slot is None:
            return
        info = self._versions.pop(uid)
        self.resident = frozenset(self._lru)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.heads.pop(slot, None)
        self._dirty = True  # gauges and bank sizes are updated by compact()
        log.debug("adapter %s v%d unloaded from slot %d", info.name, info.version, slot)

    def compact(self) -> dict[int, int]:
        """Move adapters into lower free slots and shrink the banks; return the moves (old -> new slot).

        Only between forwards: whoever holds slot numbers (running rows) must apply the moves.
        """
        if not self._dirty:
            return {}
        self._dirty = False
        moves: dict[int, int] = {}
        used = sorted(self._lru.values())
        holes = [s for s in range(1, len(used) + 1) if s not in set(used)]
        for dst, src in zip(holes, reversed(used), strict=False):
            if src < dst:
                break
            moves[src] = dst
        for src, dst in moves.items():
            for layer in self.layers.values():
                layer.move_slot(src, dst)
            if src in self.heads:
                self.heads[dst] = self.heads.pop(src)
        for uid, slot in self._lru.items():
            if slot in moves:
                self._lru[uid] = moves[slot]
        for layer in self.layers.values():
            layer.fit()
        self._update_gauges()
        return moves

    def _update_gauges(self) -> None:
        m = self.metrics
        m.adapters_resident.labels(tier="device").set(len(self._lru))
        m.adapter_resident_bytes.labels(tier="device").set(self.resident_bytes)
        m.adapter_bank_bytes.set(self.bank_bytes)


class Admission:
    """One lane step's access to the device slots: adapters of the lanes' running rows (``keep``) are
    never evicted; those that queued work waits for (``wanted``, computed only when a load needs it)
    only when nothing else is left."""

    def __init__(self, slots: DeviceSlots, keep: set[int], wanted: Callable[[], frozenset[int]]) -> None:
        self.slots = slots
        self.keep = keep
        self._wanted = wanted

    def admit(self, version: AdapterVersion, weights: Adapter) -> int | None:
        """The slot of a waiting request's adapter, loading it now; None: no room yet, keep waiting."""
        spare = frozenset() if version.uid in self.slots else self._wanted()
        try:
            slot = self.slots.acquire(version, weights, self.keep, spare)
        except SlotsExhausted:
            return None
        self.keep.add(version.uid)
        return slot
