"""Bottleneck adapters (Houlsby / Pfeiffer): read and validate the folder format against the base.

A bottleneck module is a small residual MLP applied to the output ``h`` of a layer's attention
block and/or feed-forward block, before the base adds it to the residual stream:

    h  ->  h + scaling * up(act(down(h)))        down: hidden -> size, up: size -> hidden

Houlsby places one after the attention and one after the feed-forward block of every layer
(``placement: "both"``); Pfeiffer only after the feed-forward block (``"ffn"``).

Folder format (the same file names as a PEFT folder)::

    adapter_config.json        {"peft_type": "BOTTLENECK", "task_type": "SEQ_CLS" | "CAUSAL_LM",
                                "placement": "attention" | "ffn" | "both" (or "houlsby" / "pfeiffer"),
                                "bottleneck_size": 36  (or "reduction_factor": 16 = hidden / size),
                                "activation": "relu" | "gelu" | "silu" | "tanh", "scaling": 1.0,
                                "layers": null (all) | [0, 1, ...]}
    adapter_model.safetensors  layers.<i>.<attention|ffn>.down.weight [size, hidden], .down.bias [size]
                               layers.<i>.<attention|ffn>.up.weight [hidden, size],   .up.bias [hidden]
                               the family's head, named as PEFT saves it (SEQ_CLS only): decoders
                               score.weight [labels, hidden], .bias; BERT classifier.weight, .bias
                               (and optionally bert.pooler.dense.*); RoBERTa classifier.dense.*,
                               classifier.out_proj.* (see app.models.surface)
    labels.json                optional, as for LoRA
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from app.adapters.lora_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_tensor,
    load_tensors,
    read_config,
    task_head,
)
from app.adapters.tasks import TASKS, Task
from app.errors import InvalidAdapter
from app.models.base_lm import BaseSpec
from app.models.heads import Head

PEFT_TYPE = "BOTTLENECK"
PLACES = ("attention", "ffn")
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "ffn": ("ffn",),
    "both": PLACES,
    "houlsby": PLACES,
    "pfeiffer": ("ffn",),
}
# every activation maps 0 to 0, so that rows of other adapters (zero weights in a slot) get no change
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_KEY = re.compile(r"layers\.(\d+)\.(attention|ffn)\.(down|up)\.(weight|bias)")
_CONFIG_KEYS = {
    "peft_type",
    "task_type",
    "placement",
    "bottleneck_size",
    "reduction_factor",
    "activation",
    "scaling",
    "layers",
    "base_model_name_or_path",
}

# (down [size, hidden], down bias [size], up [hidden, size], up bias [hidden]) as stored in the file
BottleneckWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class BottleneckAdapter:
    """A validated bottleneck adapter, ready to be written into device slots."""

    kind: ClassVar[Literal["bottleneck"]] = "bottleneck"

    task: Task
    rank: int  # the bottleneck size
    alpha: float  # the scaling
    target_modules: list[str]  # the places: "attention", "ffn"
    labels: list[str]
    activation: str
    # base module name (the linear whose output the module follows) -> its weights
    blocks: dict[str, BottleneckWeights] = field(repr=False)
    head: Head = field(default=(), repr=False)
    num_params: int = 0

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self.blocks)

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for block in self.blocks.values() for t in block)
        return total + sum(layer.nbytes for layer in self.head)


def sites(spec: BaseSpec) -> dict[str, dict[int, str]]:
    """For each place, layer index -> the base's linear layer whose output the module follows."""
    surface = spec.surface
    suffixes = {"attention": surface.attention_output, "ffn": surface.ffn_output}
    found: dict[str, dict[int, str]] = {place: {} for place in PLACES}
    pattern = re.compile(rf"(?:^|\.){re.escape(surface.blocks)}\.(\d+)\.(.+)$")
    for name, (out_f, _) in spec.linear_shapes.items():
        m = pattern.search(name)
        if m is None or out_f != spec.hidden_size:
            continue
        for place, suffix in suffixes.items():
            if m.group(2) == suffix:
                found[place][int(m.group(1))] = name
    return found


def _positive_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidAdapter(f"{key} must be a positive integer, got {value!r}", param=key)
    return value


def check_bottleneck_config(config: dict[str, Any], spec: BaseSpec) -> dict[str, Any]:
    """The normalized config (task, places, size, activation, scaling, layers) or InvalidAdapter."""
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise InvalidAdapter(
            f"unknown {CONFIG_FILE} fields for a bottleneck adapter: {unknown}", param=unknown[0]
        )
    task_type = config.get("task_type")
    if task_type not in TASKS:
        raise InvalidAdapter(
            f"task_type must be one of {sorted(TASKS)}, got {task_type!r}", param="task_type"
        )
    if TASKS[task_type] == "generate" and not spec.surface.can_generate:
        raise InvalidAdapter(
            f"the base model ({spec.family}, an encoder) cannot generate; it serves classification "
            "adapters (task_type SEQ_CLS) only",
            param="task_type",
        )
    placement = config.get("placement")
    if placement not in PLACEMENTS:
        raise InvalidAdapter(
            f"placement must be one of {sorted(PLACEMENTS)}, got {placement!r}", param="placement"
        )
    size = _positive_int(config, "bottleneck_size")
    if size is not None and size > spec.hidden_size:
        raise InvalidAdapter(
            f"bottleneck_size {size} exceeds the base's hidden size {spec.hidden_size}",
            param="bottleneck_size",
        )
    factor = config.get("reduction_factor")
    if size is None:
        if (
            not isinstance(factor, int | float)
            or isinstance(factor, bool)
            or not 1 <= factor <= spec.hidden_size
        ):
            raise InvalidAdapter(
                f"give bottleneck_size, or reduction_factor between 1 and {spec.hidden_size}; got {factor!r}",
                param="reduction_factor",
            )
        size = max(1, int(spec.hidden_size // factor))
    activation = config.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise InvalidAdapter(
            f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}", param="activation"
        )
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, int | float) or isinstance(scaling, bool) or not abs(scaling) < float("inf"):
        raise InvalidAdapter(f"scaling must be a finite number, got {scaling!r}", param="scaling")
    places = PLACEMENTS[placement]
    where = sites(spec)
    for place in places:
        if not where[place]:
            raise InvalidAdapter(
                f"the base model has no {place} output layer that a bottleneck module can follow",
                param="placement",
            )
    layers = config.get("layers")
    all_layers = sorted(set.intersection(*(set(where[p]) for p in places)))
    if layers is None:
        layers = all_layers
    elif (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        or len(set(layers)) != len(layers)
        or not set(layers) <= set(all_layers)
    ):
        raise InvalidAdapter(
            f"layers must be a list of distinct layer indices among 0..{max(all_layers)} (or null)",
            param="layers",
        )
    return {
        "task": TASKS[task_type],
        "places": places,
        "size": size,
        "activation": activation,
        "scaling": float(scaling),
        "layers": sorted(layers),
    }


def load_bottleneck(folder: Path, spec: BaseSpec, check_values: bool = True) -> BottleneckAdapter:
    """Parse and fully validate a bottleneck adapter folder; raise :class:`InvalidAdapter` naming the
    problem (every tensor's name, shape, dtype and, unless ``check_values`` is off, finiteness)."""
    cfg = check_bottleneck_config(read_config(folder), spec)
    size, hidden = cfg["size"], spec.hidden_size
    tensors = load_tensors(folder / WEIGHTS_FILE)
    head_keys = {f"{m}.{part}" for m in spec.surface.head_modules for part in ("weight", "bias")}
    head: dict[str, dict[str, torch.Tensor]] = {}
    for key in head_keys & set(tensors):
        module, _, part = key.rpartition(".")
        head.setdefault(module, {})[part] = tensors[key]
    expected = {
        f"layers.{i}.{place}.{part}"
        for i in cfg["layers"]
        for place in cfg["places"]
        for part in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    for key in tensors:
        if key not in expected and key not in head_keys:
            hint = "" if _KEY.fullmatch(key) else " (see the bottleneck folder format)"
            raise InvalidAdapter(
                f"unexpected tensor {key!r} for placement {cfg['places']} on layers {cfg['layers']}{hint}",
                param=WEIGHTS_FILE,
            )
    missing = sorted(expected - set(tensors))
    if missing:
        raise InvalidAdapter(
            f"missing tensors: {missing[:4]}{' ...' if len(missing) > 4 else ''}", param=WEIGHTS_FILE
        )
    where = sites(spec)
    shapes = {
        "down.weight": (size, hidden),
        "down.bias": (size,),
        "up.weight": (hidden, size),
        "up.bias": (hidden,),
    }
    blocks: dict[str, BottleneckWeights] = {}
    num_params = 0
    for i in cfg["layers"]:
        for place in cfg["places"]:
            parts = []
            for part, shape in shapes.items():
                key = f"layers.{i}.{place}.{part}"
                check_tensor(key, tensors[key], shape, check_values)
                parts.append(tensors[key])
                num_params += tensors[key].numel()
            blocks[where[place][i]] = (parts[0], parts[1], parts[2], parts[3])

    head_layers, labels = task_head(cfg["task"], head, spec, folder)
    num_params += sum(layer.numel for layer in head_layers)
    return BottleneckAdapter(
        task=cfg["task"],
        rank=size,
        alpha=cfg["scaling"],
        target_modules=list(cfg["places"]),
        labels=labels,
        activation=cfg["activation"],
        blocks=blocks,
        head=head_layers,
        num_params=num_params,
    )
