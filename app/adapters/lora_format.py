"""Read and validate a PEFT LoRA adapter folder against the base model (no model tensors touched)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from app.adapters.files import read_float_tensors
from app.adapters.tasks import TASKS, Task
from app.errors import InvalidAdapter
from app.models.base_lm import BaseSpec
from app.models.heads import Head, HeadLayer, num_labels

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA: a module's magnitude per output feature
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}

# Config fields whose non-default value asks for something this server does not apply.
_UNSUPPORTED: dict[str, str] = {
    "lora_bias": "lora_bias is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "megatron_config": "megatron_config is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "velora_config is not supported",
    "monteclora_config": "monteclora_config is not supported",
    "arrow_config": "arrow_config is not supported",
    "kasa_config": "kasa_config is not supported",
}


@dataclass
class LoraAdapter:
    """A validated LoRA adapter, ready to be written into device slots."""

    task: Task
    rank: int  # the largest rank of any module
    alpha: float
    target_modules: list[str]
    labels: list[str]
    # module name -> (A [r, in], B [out, r], scaling), tensors as stored in the file
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)
    head: Head = field(default=(), repr=False)  # classify: the family's head layers
    num_params: int = 0
    # DoRA (use_dora): module -> its magnitude vector m [out]; the layer computes
    # m / ||W0 + s·B·A||_row ⊙ (W0 x + s·B·A x) + bias (PEFT's DoRA, frozen base: a constant scale)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> Literal["lora", "dora"]:
        return "dora" if self.magnitudes else "lora"

    @property
    def modules(self) -> frozenset[str]:
        """The base's linear layers this adapter changes."""
        return frozenset(self.weights)

    @property
    def nbytes(self) -> int:
        total = sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.weights.values()
        )
        total += sum(m.numel() * m.element_size() for m in self.magnitudes.values())
        return total + sum(layer.nbytes for layer in self.head)


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern matching ``module`` with PEFT's semantics (suffix match on dotted names)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{CONFIG_FILE} is missing", param=CONFIG_FILE)
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}", param=CONFIG_FILE) from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object", param=CONFIG_FILE)
    return config


def check_config(config: dict[str, Any], spec: BaseSpec) -> Task | None:
    """Reject configurations the server cannot apply faithfully; return the task (None: not stated)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"peft_type must be LORA, IA3 or BOTTLENECK, got {peft_type!r}", param="peft_type"
        )
    task_type = config.get("task_type")
    if task_type is not None and task_type not in TASKS:
        raise InvalidAdapter(
            f"task_type must be one of {sorted(TASKS)} (or null), got {task_type!r}", param="task_type"
        )
    for key, message in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidAdapter(message, param=key)
    if config.get("fan_in_fan_out") and not spec.surface.conv1d:
        # PEFT sets it for Conv1D layers ([in, out] weights, GPT-2); lora_A and lora_B are stored
        # the same way either way, so on other bases it means the adapter was made for another one
        raise InvalidAdapter(
            f"fan_in_fan_out is for Conv1D layers (GPT-2); the {spec.family} base has linear layers",
            param="fan_in_fan_out",
        )
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias must be 'none', got {config.get('bias')!r}", param="bias")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise InvalidAdapter(f"{key} must be a positive number, got {value!r}", param=key)
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value.values()
        ):
            raise InvalidAdapter(f"{key} must map module patterns to positive numbers", param=key)
        for pat in value:
            try:
                re.compile(pat)
            except re.error as exc:
                raise InvalidAdapter(f"{key} has an invalid pattern {pat!r}: {exc}", param=key) from exc
    return TASKS[task_type] if task_type is not None else None


def read_labels(folder: Path, num_labels: int) -> list[str]:
    path = folder / LABELS_FILE
    if not path.exists():
        return [f"LABEL_{i}" for i in range(num_labels)]
    try:
        labels = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{LABELS_FILE} is not valid JSON: {exc}", param=LABELS_FILE) from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise InvalidAdapter(f"{LABELS_FILE} must be a JSON list of non-empty strings", param=LABELS_FILE)
    if len(set(labels)) != len(labels):
        raise InvalidAdapter(f"{LABELS_FILE} has duplicate labels", param=LABELS_FILE)
    if len(labels) != num_labels:
        raise InvalidAdapter(
            f"{LABELS_FILE} has {len(labels)} labels but the classification head has {num_labels}",
            param=LABELS_FILE,
        )
    return labels


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing", param=WEIGHTS_FILE)
    try:
        fast = read_float_tensors(path)
        if fast is not None:
            return fast
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}", param=WEIGHTS_FILE
        ) from exc


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], values: bool = True) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise InvalidAdapter(f"tensor {name} has dtype {t.dtype}; expected a float dtype", param=WEIGHTS_FILE)
    if tuple(t.shape) != shape:
        raise InvalidAdapter(
            f"tensor {name} has shape {list(t.shape)} but the base model needs {list(shape)}",
            param=WEIGHTS_FILE,
        )
    # one read, no temporary: a float64 sum of float weights cannot overflow, so it is finite
    # exactly when every element is (NaN and Inf propagate)
    if values and not math.isfinite(float(t.sum(dtype=torch.float64))):
        raise InvalidAdapter(f"tensor {name} contains NaN or Inf values", param=WEIGHTS_FILE)


def task_head(
    task: Task, parts: dict[str, dict[str, torch.Tensor]], spec: BaseSpec, folder: Path, prefix: str = ""
) -> tuple[Head, list[str]]:
    """A classification adapter's head and labels (:func:`read_head`); none for the other tasks,
    whose adapters must not carry one."""
    if task == "classify":
        return read_head(parts, spec, folder, prefix)
    if parts:
        raise InvalidAdapter(f"a {task} adapter must not carry a classification head", param=WEIGHTS_FILE)
    return (), []


def read_head(
    parts: dict[str, dict[str, torch.Tensor]], spec: BaseSpec, folder: Path, prefix: str = ""
) -> tuple[Head, list[str]]:
    """The family's classification head from an adapter's tensors (module -> {"weight", "bias"}),
    validated, and its labels. The last layer ([labels, in]) is required; an earlier layer the
    adapter does not carry runs as the base's own module (BERT's pooler). Tensors stay as read."""
    layers: list[HeadLayer] = []
    surface = spec.surface
    for i, (module, activation) in enumerate(surface.head):
        got = parts.get(module, {})
        last = i == len(surface.head) - 1
        base_shape = spec.linear_shapes.get(module)
        if "weight" not in got:
            if last or base_shape is None or got:
                raise InvalidAdapter(
                    f"a classification adapter needs the head {prefix}{module}.weight "
                    "(for PEFT: modules_to_save)",
                    param=WEIGHTS_FILE,
                )
            layers.append(HeadLayer(module, None, None, activation))
            continue
        weight = got["weight"]
        if last:
            rows = weight.shape[0] if weight.dim() == 2 else 0
            if rows < 1:
                raise InvalidAdapter(
                    f"the classification head {prefix}{module}.weight must be a 2-D [labels, hidden] matrix",
                    param=WEIGHTS_FILE,
                )
            shape = (rows, base_shape[1] if base_shape else spec.hidden_size)
        else:
            shape = base_shape or (spec.hidden_size, spec.hidden_size)
        check_tensor(f"{prefix}{module}.weight", weight, shape)
        bias = got.get("bias")
        if bias is not None:
            check_tensor(f"{prefix}{module}.bias", bias, (shape[0],))
        layers.append(HeadLayer(module, weight, bias, activation))
    head = tuple(layers)
    return head, read_labels(folder, num_labels(head))


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<part>.weight`` -> (module, part)."""
    if not key.startswith(PREFIX):
        raise InvalidAdapter(
            f"unexpected tensor name {key!r} (expected the PEFT prefix {PREFIX!r})", param=WEIGHTS_FILE
        )
    rest = key[len(PREFIX) :]
    for part in ("lora_A.weight", "lora_B.weight"):
        if rest.endswith("." + part):
            return rest[: -len(part) - 1], part
    if "lora_embedding_" in rest:
        raise InvalidAdapter(f"embedding LoRA ({key}) is not supported", param=WEIGHTS_FILE)
    for part in (MAGNITUDE, f"{MAGNITUDE}.weight"):  # DoRA (older PEFT versions add ".weight")
        if rest.endswith("." + part):
            return rest[: -len(part) - 1], MAGNITUDE
    module, _, part = rest.rpartition(".")
    return module, part


def backbone_name(module: str, spec: BaseSpec) -> str:
    """The served model's name of a module of its backbone, as a FEATURE_EXTRACTION adapter (made on
    the bare backbone) names it: ``layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``."""
    full = f"{spec.backbone}.{module}" if spec.backbone else module
    return full if module not in spec.linear_shapes and full in spec.linear_shapes else module


def load_lora(folder: Path, spec: BaseSpec, max_rank: int, check_values: bool = True) -> LoraAdapter:
    """Parse and fully validate a PEFT LoRA folder; raise :class:`InvalidAdapter` naming the problem.

    ``check_values=False`` skips the pass over every weight (NaN/Inf) for folders that were fully
    validated when they entered the store; names, shapes and dtypes are always checked.
    """
    config = read_config(folder)
    task = check_config(config, spec)
    surface = spec.surface
    weights_path = folder / WEIGHTS_FILE
    tensors = load_tensors(weights_path)
    rank_pattern: dict[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = config.get("alpha_pattern") or {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key)
        if task == "embed":  # PEFT wraps the backbone alone (AutoModel): its names lack its prefix
            module = backbone_name(module, spec)
        if module in surface.head_modules and part in ("weight", "bias"):
            head.setdefault(module, {})[part] = tensor
        elif part in ("lora_A.weight", "lora_B.weight", MAGNITUDE):
            parts.setdefault(module, {})[part] = tensor
        elif part in ("weight", "bias"):
            raise InvalidAdapter(
                f"tensor {key!r} is a full copy of module {module!r} (modules_to_save); only the "
                f"classification head of a SEQ_CLS adapter ({', '.join(surface.head_modules)}) is "
                "supported",
                param=WEIGHTS_FILE,
            )
        else:
            raise InvalidAdapter(f"unexpected tensor {key!r}", param=WEIGHTS_FILE)
    if not parts:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights", param=WEIGHTS_FILE)
    if task is None:  # a LoraConfig without task_type: a classification head makes it a classifier
        task = "classify" if head else "generate"
    if task == "generate" and not surface.can_generate:
        raise InvalidAdapter(
            f"the base model ({spec.family}, an encoder) cannot generate; it serves classification "
            "adapters (task_type SEQ_CLS) only",
            param="task_type",
        )

    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    max_r, num_params = 0, 0
    for module, pair in sorted(parts.items()):
        if module not in spec.linear_shapes or module in head or module in surface.head_modules[-1:]:
            raise InvalidAdapter(
                f"LoRA target {module!r} is not a linear layer of the base model", param=WEIGHTS_FILE
            )
        if {"lora_A.weight", "lora_B.weight"} - set(pair):
            raise InvalidAdapter(f"LoRA target {module!r} needs both lora_A and lora_B", param=WEIGHTS_FILE)
        if (MAGNITUDE in pair) != bool(config.get("use_dora")):
            raise InvalidAdapter(
                f"LoRA target {module!r}: use_dora and {MAGNITUDE} go together (DoRA needs both)",
                param="use_dora",
            )
        rkey = pattern_key(rank_pattern, module)
        r = int(rank_pattern[rkey] if rkey is not None else config["r"])
        akey = pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[akey] if akey is not None else config["lora_alpha"])
        if r > max_rank:
            raise InvalidAdapter(f"rank {r} of {module} exceeds the server's limit {max_rank}", param="r")
        out_f, in_f = spec.linear_shapes[module]
        a, b = pair["lora_A.weight"], pair["lora_B.weight"]
        check_tensor(f"{PREFIX}{module}.lora_A.weight", a, (r, in_f), check_values)
        check_tensor(f"{PREFIX}{module}.lora_B.weight", b, (out_f, r), check_values)
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights[module] = (*host_layout(a, b), scaling)
        max_r = max(max_r, r)
        num_params += a.numel() + b.numel()
        if MAGNITUDE in pair:
            magnitudes[module] = pair[MAGNITUDE].reshape(-1)
            check_tensor(f"{PREFIX}{module}.{MAGNITUDE}", magnitudes[module], (out_f,), check_values)
            num_params += out_f

    head_layers, labels = task_head(task, head, spec, folder, PREFIX)
    num_params += sum(layer.numel for layer in head_layers)

    return LoraAdapter(
        task=task,
        rank=max_r,
        alpha=float(config["lora_alpha"]),
        target_modules=sorted({m.rpartition(".")[2] for m in weights}),
        labels=labels,
        weights=weights,
        head=head_layers,
        num_params=num_params,
        magnitudes=magnitudes,
    )


def host_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] stored as their transposes A^T [in, r] and B^T [r, out] (each the
    transpose of a contiguous tensor), the layouts the serving matmuls read: on a CPU the device
    slots then use these very tensors (app/models/multi_lora.py), so an adapter is held once. Made
    outside inference mode, so that attributions can run a backward pass through them."""
    with torch.inference_mode(False):
        return a.t().contiguous().t(), b.t().contiguous().t()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
