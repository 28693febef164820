"""Make real PEFT adapters with random non-zero weights and record PeftModel's outputs as the oracle."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, TaskType, get_peft_model
from peft.utils import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

CLASSIFY_TEXTS = [
    "The central bank raised interest rates again to fight inflation.",
    "The striker scored twice in the second half.",
    "A new smartphone with a faster chip goes on sale next week.",
]
GENERATE_PROMPTS = ["The capital of France is", "Customer: my printer does not work.\nAgent:"]
GEN_TOKENS = 10


@dataclass
class RefAdapter:
    name: str
    folder: Path
    task: str
    labels: list[str] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)  # classify: softmax per text
    texts: dict[str, str] = field(default_factory=dict)  # generate: prompt -> greedy continuation
    token_ids: dict[str, list[int]] = field(default_factory=dict)  # prompt -> its tokens (EOS dropped)
    last_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> [vocab]


def make_adapter(
    base_path: Path,
    out_dir: Path,
    name: str,
    task: str,
    seed: int,
    labels: list[str] | None = None,
    **lora: Any,
) -> RefAdapter:
    """Create a PEFT adapter with random weights, save it, and compute PeftModel's reference outputs
    (``lora``: LoraConfig's fields, ``use_dora=True`` for DoRA; or ``ia3=True`` and IA3Config's)."""
    torch.manual_seed(seed)
    config_class: Any = IA3Config if lora.pop("ia3", False) else LoraConfig
    if config_class is IA3Config:
        lora.setdefault("init_ia3_weights", True)  # ones, scattered below
    else:
        lora.setdefault("init_lora_weights", False)
    tok = AutoTokenizer.from_pretrained(base_path)
    folder = out_dir / name
    if task == "classify":
        num_labels = len(labels) if labels else lora.pop("num_labels")
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels)
        model.config.pad_token_id = tok.pad_token_id
        cfg = config_class(task_type=TaskType.SEQ_CLS, **lora)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path)
        cfg = config_class(task_type=TaskType.CAUSAL_LM, **lora)
    peft_model = get_peft_model(model, cfg)
    for name_, param in peft_model.named_parameters():  # visible IA3 scales and DoRA magnitudes
        if name_.endswith("ia3_l.default"):
            param.data = 1 + 0.3 * torch.randn_like(param)
        elif "lora_magnitude_vector" in name_:
            param.data = param.data * (1 + 0.2 * torch.randn_like(param))
    if task == "classify":  # a visible head: random, not the near-zero default
        for wrapper in [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]:
            for layer in wrapper.modules_to_save["default"].modules():
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.normal_(layer.weight, std=0.1 if layer.out_features > 8 else 0.03)
    peft_model.eval()
    peft_model.save_pretrained(folder)
    ref = RefAdapter(name=name, folder=folder, task=task)
    with torch.inference_mode():
        if task == "classify":
            ref.labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
            if labels:
                (folder / "labels.json").write_text(json.dumps(labels))
            for text in CLASSIFY_TEXTS:
                enc = tok(text, return_tensors="pt")
                logits = peft_model(**enc).logits[0]
                ref.probs.append(torch.softmax(logits, -1).tolist())
        else:
            for prompt in GENERATE_PROMPTS:
                enc = tok(prompt, return_tensors="pt")
                ref.last_logits[prompt] = peft_model(**enc).logits[0, -1].clone()
                out = peft_model.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False)
                new = out[0, enc.input_ids.shape[1] :].tolist()
                ref.texts[prompt] = tok.decode(new, skip_special_tokens=True)
                ref.token_ids[prompt] = [t for t in new if t != tok.eos_token_id]
    del peft_model, model
    return ref


def zip_folder(folder: Path, extra: dict[str, bytes] | None = None, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, prefix + f.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_folder(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(folder.iterdir()):
            tf.add(f, arcname=prefix + f.name)
    return buf.getvalue()


def peft_greedy(base_path: Path, folder: Path | None, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy new tokens from PeftModel (or the bare base when ``folder`` is None), EOS included."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_path)
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder)
    model.eval()
    with torch.inference_mode():
        ids = torch.tensor([input_ids])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return [int(t) for t in out[0, len(input_ids) :]]


def zip_files(files: dict[str, bytes]) -> bytes:
    """A zip archive of the given file names and contents."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()
