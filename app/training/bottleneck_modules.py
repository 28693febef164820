"""Trainable bottleneck modules on a transformers model, with PEFT-like ergonomics.

``get_bottleneck_model(model, config)`` freezes the base, attaches one small residual MLP after the
attention and/or feed-forward output layer of every block (forward hooks: the base's modules stay
as they are), leaves a classification head trainable, and ``save_pretrained`` writes the folder
format that the server reads (see :mod:`app.adapters.bottleneck_format`).

Why not AdapterHub's ``adapters`` library: its releases pin transformers 4.x, while this project
pins transformers 5; the modules are a few lines, and the served format is ours either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from app.adapters.bottleneck_format import PEFT_TYPE, PLACEMENTS, sites
from app.adapters.lora_format import CONFIG_FILE, WEIGHTS_FILE
from app.models.base_lm import spec_of
from app.models.bottleneck_bank import ACTIVATION_FNS
from app.models.surface import surface_for


@dataclass
class BottleneckConfig:
    task: Literal["classify", "generate"]
    placement: str = "ffn"  # attention / ffn / both (houlsby) ; pfeiffer = ffn
    bottleneck_size: int | None = None  # None: hidden size // reduction_factor
    reduction_factor: float = 16.0
    activation: str = "relu"
    scaling: float = 1.0
    init_std: float = 1e-2  # down: small normal; up: zeros (the adapter starts as the identity)


class BottleneckModule(nn.Module):
    """``h + scaling * up(act(down(h)))`` on a layer's output."""

    def __init__(self, features: int, size: int, activation: str, scaling: float, init_std: float) -> None:
        super().__init__()
        self.down = nn.Linear(features, size)
        self.up = nn.Linear(size, features)
        self.act = ACTIVATION_FNS[activation]
        self.scaling = scaling
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaling * self.up(self.act(self.down(h)))


class BottleneckModel(nn.Module):
    """A frozen transformers model plus trainable bottleneck modules (and head, for classify)."""

    def __init__(self, model: PreTrainedModel, config: BottleneckConfig) -> None:
        super().__init__()
        if config.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, not {config.placement!r}")
        if config.activation not in ACTIVATION_FNS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_FNS)}, not {config.activation!r}")
        self.model = model
        self.config = config
        hidden = int(model.config.hidden_size)
        self.size = config.bottleneck_size or max(1, int(hidden // config.reduction_factor))
        if not 1 <= self.size <= hidden:
            raise ValueError(f"the bottleneck size must be between 1 and the hidden size {hidden}")
        where = sites(spec_of(model, "base"))
        places = PLACEMENTS[config.placement]
        for place in places:
            if not where[place]:
                raise ValueError(f"the base model has no {place} output layer for a bottleneck module")
        for p in model.parameters():
            p.requires_grad_(False)
        # the family's head layers (BERT's pooler included: trained, and saved with the adapter)
        self.head = list(surface_for(str(model.config.model_type)).head_modules)
        if config.task == "classify":
            for name in self.head:
                if not isinstance(model.get_submodule(name), nn.Linear):
                    raise ValueError(f"a classification model with a linear {name!r} head layer is needed")
                model.get_submodule(name).requires_grad_(True)
        self.adapters = nn.ModuleDict()
        layers = sorted(set.intersection(*(set(where[p]) for p in places)))
        for i in layers:
            for place in places:
                module = BottleneckModule(
                    hidden, self.size, config.activation, config.scaling, config.init_std
                )
                self.adapters[f"{i}_{place}"] = module
                target = model.get_submodule(where[place][i])
                target.register_forward_hook(self._hook(module))
        self.places, self.layers = places, layers
        self._enabled = True

    def _hook(self, module: BottleneckModule) -> Callable[..., torch.Tensor]:
        def hook(_: nn.Module, __: Any, out: torch.Tensor) -> torch.Tensor:
            return module(out) if self._enabled else out

        return hook

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs)  # type: ignore[operator]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base inside this block (the modules stay attached)."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": PEFT_TYPE,
            "task_type": "SEQ_CLS" if self.config.task == "classify" else "CAUSAL_LM",
            "placement": "both" if len(self.places) == 2 else self.places[0],
            "bottleneck_size": self.size,
            "activation": self.config.activation,
            "scaling": self.config.scaling,
            "layers": None,
            "base_model_name_or_path": str(getattr(self.model.config, "_name_or_path", "")),
        }
        tensors: dict[str, torch.Tensor] = {}
        for key, module in self.adapters.items():
            i, place = key.split("_", 1)
            for part in ("down", "up"):
                linear: nn.Linear = getattr(module, part)
                tensors[f"layers.{i}.{place}.{part}.weight"] = (
                    linear.weight.detach().float().cpu().contiguous()
                )
                tensors[f"layers.{i}.{place}.{part}.bias"] = linear.bias.detach().float().cpu().contiguous()
        if self.config.task == "classify":
            for name in self.head:
                for part, tensor in self.model.get_submodule(name).named_parameters():
                    tensors[f"{name}.{part}"] = tensor.detach().float().cpu().contiguous()
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def get_bottleneck_model(model: PreTrainedModel, config: BottleneckConfig) -> BottleneckModel:
    """Attach trainable bottleneck modules to ``model`` (frozen); see :class:`BottleneckModel`."""
    return BottleneckModel(model, config)
