"""Per-adapter classification heads: the family's head layers (``ModelSurface.head``), each the
adapter's own weights (what PEFT saves through ``modules_to_save``) or, where the adapter carries
none, the base's own module (BERT's pooler)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.models.bottleneck_bank import ACTIVATION_FNS


@dataclass(frozen=True)
class HeadLayer:
    module: str  # the module's name in the base model (PEFT's key without prefix and suffix)
    weight: torch.Tensor | None  # [out, in]; None: the base's own module runs
    bias: torch.Tensor | None
    activation: str | None  # applied after the layer (None: the last layer, the logits)

    def to(self, device: torch.device, dtype: torch.dtype) -> HeadLayer:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, dtype)

        return HeadLayer(self.module, move(self.weight), move(self.bias), self.activation)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in (self.weight, self.bias) if t is not None)


Head = tuple[HeadLayer, ...]


def head_nbytes(head: Head) -> int:
    return sum(layer.nbytes for layer in head)


def num_labels(head: Head) -> int:
    last = head[-1].weight
    return 0 if last is None else int(last.shape[0])


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    return x if activation is None else ACTIVATION_FNS[activation](x)
