"""Shared benchmark set-up: the base model, PEFT adapters with random weights, inputs, timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

TEXT = (
    "The government announced a new plan on Tuesday to cut energy bills for households, while "
    "analysts warned that rising interest rates and a weaker pound could push inflation higher "
    "again before the end of the year, hurting retailers and small businesses across the country."
)
PROMPT = "Customer: my internet connection keeps dropping every few minutes. What should I do?\nAgent:"


def make_peft(
    base_path: Path,
    task: str,
    n: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    num_labels: int = 5,
    target_modules: str | list[str] = "all-linear",
) -> PeftModel:
    """A PeftModel holding ``n`` rank-``rank`` LoRA adapters ``a0..a{n-1}`` with random weights."""
    torch.manual_seed(0)
    if task == "classify":
        model: Any = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=num_labels, dtype=dtype
        )
        if model.config.pad_token_id is None:  # decoders: pad with EOS (encoders have a pad token)
            model.config.pad_token_id = model.config.eos_token_id
        task_type = TaskType.SEQ_CLS
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        task_type = TaskType.CAUSAL_LM
    cfg = LoraConfig(
        task_type=task_type,
        r=rank,
        lora_alpha=2 * rank,
        target_modules=target_modules,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model.to(device), cfg, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", cfg)
    for name, param in peft_model.named_parameters():  # keep deltas realistic in size
        if "lora_B" in name:
            param.data.mul_(0.01)
    peft_model.eval()
    return peft_model


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def save_adapters(peft_model: PeftModel, out: Path, n: int, labels: list[str] | None = None) -> list[Path]:
    """Write each adapter as its own store-ready PEFT folder."""
    peft_model.save_pretrained(str(out))  # one sub-folder per named adapter
    folders = []
    for i in range(n):
        src = out / f"a{i}"
        dst = out.parent / f"{out.name}-store" / f"a{i}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (dst / f).write_bytes((src / f).read_bytes())
        if labels:
            (dst / "labels.json").write_text(json.dumps(labels))
        folders.append(dst)
    return folders


def save_bottlenecks(
    out: Path,
    n: int,
    hidden: int,
    num_layers: int,
    task: str,
    labels: list[str] | None = None,
    head: str = "score",
) -> list[Path]:
    """Write ``n`` Houlsby bottleneck adapters (attention and feed-forward, reduction factor 16)
    with random weights as store-ready folders ``b0..b{n-1}`` (``head``: the classifier's name)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    size = hidden // 16
    folders = []
    for a in range(n):
        tensors: dict[str, torch.Tensor] = {}
        for i in range(num_layers):
            for place in ("attention", "ffn"):
                p = f"layers.{i}.{place}"
                tensors[f"{p}.down.weight"] = torch.randn(size, hidden, generator=g) * 0.02
                tensors[f"{p}.down.bias"] = torch.zeros(size)
                tensors[f"{p}.up.weight"] = torch.randn(hidden, size, generator=g) * 0.02
                tensors[f"{p}.up.bias"] = torch.zeros(hidden)
        config = {
            "peft_type": "BOTTLENECK",
            "task_type": "SEQ_CLS" if task == "classify" else "CAUSAL_LM",
            "placement": "houlsby",
            "bottleneck_size": size,
            "activation": "relu",
        }
        if labels:
            tensors[f"{head}.weight"] = torch.randn(len(labels), hidden, generator=g) * 0.02
        folder = out / f"b{a}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        if labels:
            (folder / "labels.json").write_text(json.dumps(labels))
        folders.append(folder)
    return folders


def machine_line() -> str:
    """The machine a table was measured on: CPU, cores, instruction sets, PyTorch's CPU dispatch
    level, CUDA when there is one (:func:`app.platform.capability`), and torch's version."""
    from app.platform import capability

    return f"machine: {capability().line()}, torch {torch.__version__}"
