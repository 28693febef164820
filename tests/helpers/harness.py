"""Run rows of a batch straight through the engine's wrapped layers (no server in between)."""

from __future__ import annotations

from pathlib import Path

import torch

from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.models.base_lm import BaseLM, load_base_model
from app.models.multi_lora import RoutingContext, wrap_linear_layers


def wrapped_model(base_path: Path, cache_dir: Path, slots: int) -> tuple[BaseLM, Runner, DeviceSlots]:
    """A fresh base model with its linear layers wrapped, a runner and device slots for it."""
    base = load_base_model(str(base_path), cache_dir, "cpu", "float32")
    ctx = RoutingContext()
    layers = wrap_linear_layers(base.model, ctx)
    return base, Runner(base, ctx), DeviceSlots(layers, slots, base.device, base.dtype)


def last_logits(base: BaseLM, runner: Runner, rows: list[tuple[int, list[int]]]) -> torch.Tensor:
    """Last-token logits [rows, vocab] of right-padded rows (slot, token ids) run in one forward."""
    width = max(len(ids) for _, ids in rows)
    ids = torch.full((len(rows), width), runner.pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (_, toks) in enumerate(rows):
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    with runner.routed([slot for slot, _ in rows]), torch.inference_mode():
        logits = base.model(input_ids=ids, attention_mask=mask).logits
    return torch.stack([logits[i, len(toks) - 1] for i, (_, toks) in enumerate(rows)])
