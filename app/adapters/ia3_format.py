"""Read and validate a PEFT IA³ adapter folder (``IA3Config``): one learned vector per targeted linear
layer, scaling a feed-forward layer's input (``feedforward_modules``, stored [1, in]) or another
layer's output, bias included (stored [out, 1]); as PEFT's ``IA3Layer.forward``. Served per row from
the layers' scale banks (app/models/scale_bank.py), beside LoRA, DoRA and bottleneck rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from app.adapters.lora_format import (
    PREFIX,
    WEIGHTS_FILE,
    backbone_name,
    check_tensor,
    load_tensors,
    read_config,
    task_head,
)
from app.adapters.tasks import TASKS, Task
from app.errors import InvalidAdapter
from app.models.base_lm import BaseSpec
from app.models.heads import Head

PEFT_TYPE = "IA3"
PART = "ia3_l"
# config fields whose non-default value asks for something this server does not apply
_UNSUPPORTED = {"layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern"}


@dataclass
class IA3Adapter:
    kind: ClassVar[Literal["ia3"]] = "ia3"

    task: Task
    target_modules: list[str]
    labels: list[str]
    # module -> (its vector [features], whether it scales the input: a feed-forward module)
    scales: dict[str, tuple[torch.Tensor, bool]] = field(repr=False)
    head: Head = field(default=(), repr=False)
    num_params: int = 0
    rank: int = 0  # (no rank: listed as 0)
    alpha: float = 1.0

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self.scales)

    @property
    def nbytes(self) -> int:
        total = sum(v.numel() * v.element_size() for v, _ in self.scales.values())
        return total + sum(layer.nbytes for layer in self.head)


def load_ia3(folder: Path, spec: BaseSpec, check_values: bool = True) -> IA3Adapter:
    """Parse and fully validate a PEFT IA³ folder; :class:`InvalidAdapter` names the problem."""
    config = read_config(folder)
    task_type = config.get("task_type")
    if task_type not in TASKS:
        raise InvalidAdapter(
            f"task_type must be one of {sorted(TASKS)}, got {task_type!r}", param="task_type"
        )
    task = TASKS[task_type]
    if task == "generate" and not spec.surface.can_generate:
        raise InvalidAdapter(
            f"the base model ({spec.family}, an encoder) cannot generate; it serves classification "
            "and embedding adapters only",
            param="task_type",
        )
    for key in _UNSUPPORTED:
        if config.get(key) is not None:
            raise InvalidAdapter(f"{key} is not supported", param=key)
    if config.get("fan_in_fan_out") and not spec.surface.conv1d:
        raise InvalidAdapter(
            f"fan_in_fan_out is for Conv1D layers (GPT-2); the {spec.family} base has linear layers",
            param="fan_in_fan_out",
        )
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        feedforward = [feedforward]
    scales: dict[str, tuple[torch.Tensor, bool]] = {}
    head: dict[str, dict[str, torch.Tensor]] = {}
    num_params = 0
    for key, tensor in load_tensors(folder / WEIGHTS_FILE).items():
        if not key.startswith(PREFIX):
            raise InvalidAdapter(f"unexpected tensor name {key!r} (expected the PEFT prefix {PREFIX!r})")
        module, _, part = key[len(PREFIX) :].rpartition(".")
        if task == "embed":
            module = backbone_name(module, spec)
        if module in spec.surface.head_modules and part in ("weight", "bias"):
            head.setdefault(module, {})[part] = tensor
            continue
        if part != PART:
            raise InvalidAdapter(f"unexpected tensor {key!r}", param=WEIGHTS_FILE)
        if module not in spec.linear_shapes or module in spec.surface.head_modules[-1:]:
            raise InvalidAdapter(
                f"IA3 target {module!r} is not a linear layer of the base model", param=WEIGHTS_FILE
            )
        out_f, in_f = spec.linear_shapes[module]
        ff = any(module == m or module.endswith(f".{m}") for m in feedforward)
        check_tensor(key, tensor, (1, in_f) if ff else (out_f, 1), check_values)
        scales[module] = (tensor.reshape(-1), ff)
        num_params += tensor.numel()
    if not scales:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no IA3 vectors", param=WEIGHTS_FILE)
    head_layers, labels = task_head(task, head, spec, folder, PREFIX)
    num_params += sum(layer.numel for layer in head_layers)
    return IA3Adapter(
        task=task,
        target_modules=sorted({m.rpartition(".")[2] for m in scales}),
        labels=labels,
        scales=scales,
        head=head_layers,
        num_params=num_params,
    )
