"""Which adapter slot each row of the running forward uses: set once per forward, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BASE_SLOT = 0


@dataclass
class Routing:
    """Slots of the rows of the batch now running (set by the engine before each forward)."""

    slots: list[int]  # [batch] adapter slot per row, 0 = base
    index: torch.Tensor | None = None  # [batch] the same slots as a device tensor (mixed batches)
    single: int | None = None  # the one slot every row shares, if any
    max_slot: int = 0
    # set for decode steps: the gathered per-row weights are reused while the key stays the same
    reuse_key: int | None = None

    @classmethod
    def build(cls, slots: list[int], device: torch.device, reuse_key: int | None = None) -> Routing:
        distinct = set(slots)
        if len(distinct) == 1:
            return cls(slots=slots, single=slots[0])
        index = torch.tensor(slots, dtype=torch.long, device=device)
        return cls(slots=slots, index=index, max_slot=max(slots), reuse_key=reuse_key)


def runs_of(slots: list[int]) -> tuple[tuple[int, int, int], ...]:
    """The runs of equal consecutive slots as (slot, start, end)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            runs.append((slots[start], start, i))
            start = i
    return tuple(runs)


class RoutingContext:
    """Shared by all wrapped layers of one model; holds the routing of the running forward."""

    def __init__(self, lora_bits: int = 8) -> None:
        self.routing: Routing | None = None
        # the bits of the LoRA weights the native kernel reads (8 or 4: app/kernels/lora_table.py)
        self.lora_bits = lora_bits
        # bumped whenever LoRA weights enter, leave or move between slots of any layer: what was
        # laid out from the slots' weights (app/models/projection_groups.py) is current while it stays
        self.generation = 0
