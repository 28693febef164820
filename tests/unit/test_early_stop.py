"""Early stopping: the best epoch by the validation score is kept and put back; it stops after
``patience`` epochs without a better one; without patience the last epoch's weights stay."""

from __future__ import annotations

import torch
from torch import nn

from app.training.early_stop import EarlyStopping


def _run(patience: int | None, f1s: list[float]) -> tuple[EarlyStopping, nn.Linear, list[torch.Tensor], int]:
    model = nn.Linear(2, 2)
    stopper = EarlyStopping("classify", patience)
    seen, ran = [], 0
    for epoch, f1 in enumerate(f1s, start=1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))  # "training" changes the weights every epoch
        seen.append(model.weight.detach().clone())
        ran = epoch
        if stopper.update(model, epoch, {"macro_f1": f1, "accuracy": 0.5}):
            break
    stopper.restore(model)
    return stopper, model, seen, ran


def test_stops_after_patience_and_keeps_the_best() -> None:
    stopper, model, seen, ran = _run(2, [0.3, 0.6, 0.5, 0.55, 0.9])
    assert ran == 4 and stopper.stopped and stopper.best_epoch == 2
    assert torch.equal(model.weight, seen[1])
    assert stopper.summary() == {"best_epoch": 2, "stopped_early": True, "patience": 2}


def test_an_improvement_resets_the_count() -> None:
    stopper, model, seen, ran = _run(2, [0.3, 0.2, 0.4, 0.35, 0.5, 0.45])
    assert ran == 6 and not stopper.stopped and stopper.best_epoch == 5
    assert torch.equal(model.weight, seen[4])


def test_without_patience_the_last_epoch_stays() -> None:
    stopper, model, seen, ran = _run(None, [0.3, 0.6, 0.5])
    assert ran == 3 and stopper.best_epoch == 2 and torch.equal(model.weight, seen[2])


def test_generation_keeps_the_lowest_loss() -> None:
    model = nn.Linear(2, 2)
    stopper = EarlyStopping("generate", 1)
    assert not stopper.update(model, 1, {"loss": 2.0, "perplexity": 7.4})
    assert not stopper.update(model, 2, {"loss": 1.5, "perplexity": 4.5})
    assert stopper.update(model, 3, {"loss": 1.6, "perplexity": 5.0})
    assert stopper.best_epoch == 2
