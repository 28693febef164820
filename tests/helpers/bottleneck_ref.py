"""Bottleneck adapters with random weights, and a plain reference implementation to check them by.

The reference is independent of the server's banks: ``nn.Linear`` modules called from forward
hooks on the base's attention and feed-forward output layers of a stock transformers model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

SITES = {"attention": "self_attn.o_proj", "ffn": "mlp.down_proj"}
# where Houlsby/Pfeiffer modules sit in other families (after the attention output and the
# feed-forward output projections; in BERT-style post-LayerNorm blocks before the LayerNorm)
FAMILY_SITES = {
    "gpt2": {"attention": "attn.c_proj", "ffn": "mlp.c_proj"},
    "bert": {"attention": "attention.output.dense", "ffn": "output.dense"},
    "roberta": {"attention": "attention.output.dense", "ffn": "output.dense"},
    "xlm-roberta": {"attention": "attention.output.dense", "ffn": "output.dense"},
    "electra": {"attention": "attention.output.dense", "ffn": "output.dense"},
    "distilbert": {"attention": "attention.out_lin", "ffn": "ffn.lin2"},
}
PLACES = {"attention": ["attention"], "ffn": ["ffn"], "both": ["attention", "ffn"]}
ACTS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


@dataclass
class BottleneckRef:
    name: str
    folder: Path
    task: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    labels: list[str] = field(default_factory=list)


def make_bottleneck(
    out_dir: Path,
    name: str,
    task: str,
    hidden: int,
    num_layers: int,
    seed: int,
    placement: str = "both",
    size: int = 32,
    activation: str = "relu",
    scaling: float = 1.0,
    layers: list[int] | None = None,
    labels: list[str] | None = None,
    std: float = 0.05,
    head: dict[str, tuple[int, int] | tuple[int]] | None = None,
) -> BottleneckRef:
    """Write a bottleneck adapter folder with random non-zero weights (and a head for classify:
    ``score`` [labels, hidden] with a bias, or the tensors and shapes ``head`` names)."""
    g = torch.Generator().manual_seed(seed)
    config: dict[str, Any] = {
        "peft_type": "BOTTLENECK",
        "task_type": {"classify": "SEQ_CLS", "generate": "CAUSAL_LM", "embed": "FEATURE_EXTRACTION"}[task],
        "placement": placement,
        "bottleneck_size": size,
        "activation": activation,
        "scaling": scaling,
        "layers": layers,
    }
    tensors: dict[str, torch.Tensor] = {}
    for i in layers if layers is not None else range(num_layers):
        for place in PLACES[placement]:
            p = f"layers.{i}.{place}"
            tensors[f"{p}.down.weight"] = torch.randn(size, hidden, generator=g) * std
            tensors[f"{p}.down.bias"] = torch.randn(size, generator=g) * std
            tensors[f"{p}.up.weight"] = torch.randn(hidden, size, generator=g) * std
            tensors[f"{p}.up.bias"] = torch.randn(hidden, generator=g) * std
    if task == "classify" and head is not None:
        for key, shape in head.items():
            tensors[key] = torch.randn(*shape, generator=g) * 0.1
    elif task == "classify":
        assert labels
        tensors["score.weight"] = torch.randn(len(labels), hidden, generator=g) * 0.03
        tensors["score.bias"] = torch.randn(len(labels), generator=g) * 0.1
    folder = out_dir / name
    write_folder(folder, config, tensors, labels if task == "classify" else None)
    return BottleneckRef(name, folder, task, config, tensors, labels or [])


def write_folder(
    folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], labels: list[str] | None = None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    if labels:
        (folder / "labels.json").write_text(json.dumps(labels))


def reference_model(base_path: Path, ref: BottleneckRef) -> nn.Module:
    """A stock transformers model with the adapter's modules applied by forward hooks."""
    if ref.task == "classify":
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=len(ref.labels))
        model.config.pad_token_id = AutoTokenizer.from_pretrained(base_path).pad_token_id
        head = {k: v for k, v in ref.tensors.items() if not k.startswith("layers.")}
        with torch.no_grad():
            if "score.bias" in head:
                model.score = nn.Linear(model.config.hidden_size, len(ref.labels), bias=True)
            result = model.load_state_dict(head, strict=False)
            assert not result.unexpected_keys, result.unexpected_keys
    elif ref.task == "embed":
        model = AutoModel.from_pretrained(base_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path)
    sites = FAMILY_SITES.get(model.config.model_type, SITES)
    blocks = _blocks(model)
    act = ACTS[ref.config["activation"]]
    scaling = ref.config["scaling"]
    keys = {k.rsplit(".", 2)[0] for k in ref.tensors if k.startswith("layers.")}
    for key in sorted(keys):
        _, i, place = key.split(".")
        down = nn.Linear(*ref.tensors[f"{key}.down.weight"].shape[::-1])
        up = nn.Linear(*ref.tensors[f"{key}.up.weight"].shape[::-1])
        with torch.no_grad():
            down.weight.copy_(ref.tensors[f"{key}.down.weight"])
            down.bias.copy_(ref.tensors[f"{key}.down.bias"])
            up.weight.copy_(ref.tensors[f"{key}.up.weight"])
            up.bias.copy_(ref.tensors[f"{key}.up.bias"])

        def hook(
            _: nn.Module, __: Any, out: torch.Tensor, down: nn.Linear = down, up: nn.Linear = up
        ) -> torch.Tensor:
            return out + scaling * up(act(down(out)))

        blocks[int(i)].get_submodule(sites[place]).register_forward_hook(hook)
    return model.eval()


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a stock transformers model, in order."""
    base = model.base_model
    for path in ("layers", "h", "encoder.layer", "transformer.layer"):
        try:
            blocks = base.get_submodule(path)
        except AttributeError:
            continue
        assert isinstance(blocks, nn.ModuleList)
        return blocks
    raise AssertionError(f"no transformer blocks found in {type(model).__name__}")
