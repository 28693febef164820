"""Validation scores (macro-F1) and early stopping on the validation split (``patience``): after
each epoch's evaluation, the trainable weights of the best epoch so far are kept (classification: by
macro-F1, then accuracy; generation: by the lowest token loss); training stops when ``patience``
epochs in a row did not improve on it, and the best epoch's weights are put back before the adapter
is saved."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def macro_f1(pred: list[int], gold: list[int], num_labels: int) -> float:
    scores = []
    for c in range(num_labels):
        tp = sum(1 for p, g in zip(pred, gold, strict=True) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gold, strict=True) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gold, strict=True) if p != c and g == c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_labels


def score(task: str, val: dict[str, float]) -> tuple[float, ...]:
    """Higher is better."""
    if task == "classify":
        return (val["macro_f1"], val["accuracy"])
    return (-val["loss"],)


class EarlyStopping:
    def __init__(self, task: str, patience: int | None) -> None:
        self.task = task
        self.patience = patience  # None: never stop early (the best epoch is still kept)
        self.best: tuple[float, ...] | None = None
        self.best_epoch = 0
        self.best_val: dict[str, float] | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self.stopped = False

    def update(self, model: nn.Module, epoch: int, val: dict[str, float]) -> bool:
        """Record ``epoch``'s validation result; True when training should stop now."""
        now = score(self.task, val)
        if self.best is None or now > self.best:
            self.best, self.best_epoch, self.best_val = now, epoch, val
            self._weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            return False
        self.stopped = self.patience is not None and epoch - self.best_epoch >= self.patience
        return self.stopped

    def restore(self, model: nn.Module) -> None:
        """Put the best epoch's trainable weights back (early stopping only: without ``patience``
        the last epoch's stay, as before; nothing when no epoch was evaluated)."""
        if not self._weights or self.patience is None:
            return
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self._weights:
                    param.copy_(self._weights[name])

    def final(self, history: list[dict[str, Any]]) -> dict[str, float] | None:
        """The validation result of the weights saved: the best epoch's, or (no patience) the last's."""
        if self.patience is not None and self.best_val is not None:
            return self.best_val
        return history[-1].get("val") if history else None

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "stopped_early": self.stopped, "patience": self.patience}
