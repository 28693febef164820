"""Adapter banks made while the engine is in inference mode (a generation admitted inside it) are
normal tensors: they are cleared in place outside it and read by an attribution's backward pass."""

from __future__ import annotations

import torch

from app.models.bottleneck_bank import BottleneckBank
from app.models.routing import Routing
from app.models.scale_bank import ScaleBank


def test_scale_banks_made_in_inference_mode_serve_autograd_and_clear_outside_it() -> None:
    bank = ScaleBank(4, 3, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        bank.set_slot(1, {"in": torch.full((4,), 2.0), "out": torch.full((3,), 3.0)}, 2)
    assert not any(torch.is_inference(t) for t in bank.banks.values())
    x = torch.ones(1, 1, 4, requires_grad=True)
    routing = Routing.build([1], torch.device("cpu"))
    out = bank.scale_output(bank.scale_input(x, routing)[..., :3], routing)
    out.sum().backward()  # saving the bank rows for backward: not allowed for inference tensors
    assert x.grad is not None and torch.equal(x.grad[0, 0, :3], torch.full((3,), 6.0))
    bank.clear_slot(1)  # in place, outside inference mode
    assert bank.uses == {}
    with torch.inference_mode():
        bank.set_slot(1, {"in": torch.full((4,), 2.0)}, 4)
        bank.fit(2)
    assert not any(torch.is_inference(t) for t in bank.banks.values())


def test_bottleneck_banks_made_in_inference_mode_are_normal_tensors() -> None:
    bank = BottleneckBank(4, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        bank._resize(2, 3)
    assert not any(torch.is_inference(t) for t in (bank.down, bank.down_b, bank.up, bank.up_b))
