"""Load the frozen base model: a local HF folder, or a GGUF file converted once to safetensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from app.models.attention import use_grouped_sdpa
from app.models.pooling import Pooling, read_pooling
from app.models.quantize import Quantization, Setting, quantize_model, resolve
from app.models.sources import resolve_model_path
from app.models.surface import ModelSurface, surface_for
from app.platform import return_freed_memory

__all__ = ["BaseLM", "BaseSpec", "check_base", "load_base_model", "read_spec", "resolve_model_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseSpec:
    """What adapters are validated against: pure data, no tensors."""

    model_id: str
    hidden_size: int
    vocab_size: int
    max_context: int | None = None  # positions the model was trained for, when its config says
    # linear (and Conv1D) layers: name -> (out, in)
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    family: str = "llama"  # the config's model_type (see app.models.surface)
    backbone: str = ""  # the loaded model's attribute holding the bare backbone ("model", "bert")

    @property
    def surface(self) -> ModelSurface:
        return surface_for(self.family)


@dataclass
class BaseLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: BaseSpec
    device: torch.device
    dtype: torch.dtype
    path: Path
    surface: ModelSurface
    quantization: Quantization = "none"
    weight_bytes: int = 0  # the base's weights in memory (after quantization)
    pooling: Pooling = field(default_factory=lambda: Pooling("mean", True, "the family's default"))


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            shapes[name] = (mod.out_features, mod.in_features)
        elif isinstance(mod, Conv1D):  # weight [in, out]
            shapes[name] = (int(mod.weight.shape[1]), int(mod.weight.shape[0]))
    return shapes


def spec_of(model: PreTrainedModel, model_id: str) -> BaseSpec:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None:
        positions -= surface_for(str(config.model_type)).reserved_positions
    return BaseSpec(
        model_id=model_id,
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_context=positions,
        linear_shapes=linear_shapes(model),
        family=str(config.model_type),
        backbone=str(getattr(model, "base_model_prefix", "") or ""),
    )


def model_class(surface: ModelSurface) -> Any:
    """Decoders load with their LM head (generation; classification heads come with adapters),
    encoders as sequence classifiers (the module names PEFT saves for them, the pooler of BERT)."""
    return AutoModelForCausalLM if surface.can_generate else AutoModelForSequenceClassification


def check_base(base_model: str, cache_dir: Path) -> ModelSurface:
    """The configured base's family surface (converting a GGUF base once); :class:`UnsupportedBase`
    when the server cannot serve it. Reads the config only."""
    path, _ = resolve_model_path(base_model, cache_dir)
    return surface_for(str(AutoConfig.from_pretrained(path).model_type))


def read_spec(base_model: str, cache_dir: Path) -> BaseSpec:
    """The base model's spec without loading its weights (a model skeleton on the meta device)."""
    path, model_id = resolve_model_path(base_model, cache_dir)
    config = AutoConfig.from_pretrained(path)
    surface = surface_for(str(config.model_type))
    with torch.device("meta"):
        skeleton = model_class(surface).from_config(config)
    return spec_of(skeleton, model_id)


def load_base_model(
    base_model: str, cache_dir: Path, device: str, dtype: str, quantization: Setting = "none"
) -> BaseLM:
    """Load the frozen base model (eval mode, no gradients) on the resolved device and dtype, its
    weights quantized as asked (:mod:`app.models.quantize`)."""
    path, model_id = resolve_model_path(base_model, cache_dir)
    surface = surface_for(str(AutoConfig.from_pretrained(path).model_type))  # refuse before loading
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # weights the folder lacks (an encoder's pooler or head) get the same values on every start
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of the unused default head: the warning below says more
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, info = model_class(surface).from_pretrained(path, dtype=dt, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    backbone = f"{model.base_model_prefix}."  # weights outside it are the (unused) default head
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(backbone)]
    if missing:
        log.warning(
            "the base folder lacks %d weights (%s...), initialised with a fixed seed; adapters trained "
            "on another copy should carry them (PEFT: modules_to_save)",
            len(missing),
            ", ".join(sorted(missing)[:3]),
        )
    model.to(dev)
    model.eval()
    use_grouped_sdpa(model)
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = spec_of(model, model_id)
    kind = resolve(quantization, dev, getattr(model.config, "model_type", None))
    nbytes = quantize_model(model, kind, keep=surface.head_modules, tokenizer=tokenizer)
    if kind != "none":
        return_freed_memory()  # the float weights just replaced
    log.info(
        "base model %s loaded from %s on %s (%s, quantization %s: %.0f MB of weights)",
        model_id,
        path,
        dev,
        dt,
        kind if quantization == kind else f"{kind} ({quantization})",
        nbytes / 1e6,
    )
    return BaseLM(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=dev,
        dtype=dt,
        path=path,
        surface=surface,
        quantization=kind,
        weight_bytes=nbytes,
        pooling=read_pooling(path, encoder=not surface.can_generate),
    )
