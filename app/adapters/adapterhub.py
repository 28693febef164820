"""Import bottleneck adapters saved by AdapterHub's ``adapters`` library into the served format.

``model.save_adapter(folder, name, use_safetensors=True)`` writes ``adapter_config.json`` (the
library's ``BnConfig`` under ``"config"``) and ``adapter.safetensors`` with keys
``model.layers.<i>.<attention|output>_adapters.adapters.<name>.adapter_<down.0|up>.<weight|bias>``
(decoders) or ``bert.encoder.layer.<i>.<attention.output|output>.adapters.<name>...`` (BERT-style
encoders); ``with_head=True`` adds ``head_config.json`` and ``model_head.safetensors``.

Only what the served format computes exactly is accepted: modules on the attention and/or
feed-forward output ``h`` with ``h + scaling * up(act(down(h)))`` before the base's residual add
(and, in post-LayerNorm encoders, before the LayerNorm) — ``original_ln_before: false``
(``double_seq_bn`` / Houlsby does this), no adapter layer norms, gating, parallel or PHM variants.
The Pfeiffer preset ``seq_bn`` sets ``original_ln_before: true``, which feeds the residual stream
``x + h`` into the module instead; it is refused with a message saying so. Pickle checkpoints
(``pytorch_adapter.bin``) are refused.

A ``classification`` head (``layers: 2``, on the first token: ``use_pooler: false``) is the served
head of BERT- and RoBERTa-style encoders when its activation is the family's: its first linear
layer becomes BERT's pooler (or RoBERTa's ``classifier.dense``), its second the classifier; the
labels come from its ``label2id``. Other heads are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from app.adapters.archive import PICKLE_SUFFIXES
from app.adapters.bottleneck_format import PEFT_TYPE, BottleneckAdapter, load_bottleneck
from app.adapters.lora_format import CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE, load_tensors
from app.errors import InvalidAdapter
from app.models.base_lm import BaseSpec

HUB_WEIGHTS = "adapter.safetensors"
HUB_HEAD_CONFIG = "head_config.json"
HUB_HEAD_WEIGHTS = "model_head.safetensors"
_ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "tanh": "tanh"}
_PLACES = {
    "attention_adapters.adapters": "attention",
    "output_adapters.adapters": "ffn",
    "attention.output.adapters": "attention",
    "output.adapters": "ffn",
}
_KEY = re.compile(
    r"(?:.*\.)?(?:layers|layer)\.(\d+)\."
    r"(attention_adapters\.adapters|output_adapters\.adapters|attention\.output\.adapters|output\.adapters)"
    r"\.[^.]+\.adapter_(down\.0|up)\.(weight|bias)"
)
_HEAD_KEY = re.compile(r"heads\.[^.]+\.(\d+)\.(weight|bias)")
# BnConfig fields that must hold these values for the served computation to be exact
_REQUIRED: dict[str, Any] = {
    "original_ln_before": False,
    "original_ln_after": True,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "use_gating": False,
    "phm_layer": False,
    "inv_adapter": None,
    "cross_adapter": False,
}


def _hub_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{path} is not a readable JSON file: {exc}", param=CONFIG_FILE) from exc
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not str(saved.get("version", "")).startswith("adapters."):
        raise InvalidAdapter(f"{path} is not an AdapterHub `adapters` config", param=CONFIG_FILE)
    if config.get("architecture") not in (None, "bottleneck"):
        raise InvalidAdapter(f"only bottleneck adapters can be imported, not {config['architecture']!r}")
    return config


def check_hub_config(config: dict[str, Any]) -> dict[str, Any]:
    """The served config fields for an AdapterHub ``BnConfig``, or InvalidAdapter saying why not."""
    if config.get("original_ln_before"):
        raise InvalidAdapter(
            "original_ln_before is true (e.g. the seq_bn / Pfeiffer preset): on a pre-norm base the module "
            "then reads the residual stream x + h, which the served bottleneck format does not compute; "
            "adapters with original_ln_before false (double_seq_bn / Houlsby, or a BnConfig) can be imported",
            param="original_ln_before",
        )
    for key, value in _REQUIRED.items():
        if config.get(key, value) != value:
            raise InvalidAdapter(f"{key}={config.get(key)!r} is not supported (needs {value!r})", param=key)
    act = str(config.get("non_linearity", "relu")).lower()
    if act not in _ACTIVATIONS:
        raise InvalidAdapter(f"non_linearity {act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, int | float) or isinstance(scaling, bool):
        raise InvalidAdapter(f"scaling {scaling!r} is not supported (a number is)", param="scaling")
    places = [p for key, p in (("mh_adapter", "attention"), ("output_adapter", "ffn")) if config.get(key)]
    if not places:
        raise InvalidAdapter("the config places no module (mh_adapter and output_adapter are false)")
    return {
        "activation": _ACTIVATIONS[act],
        "scaling": float(scaling),
        "placement": "both" if len(places) == 2 else places[0],
    }


def convert_adapterhub(source: Path, output: Path, spec: BaseSpec) -> BottleneckAdapter:
    """Write ``source`` (an AdapterHub bottleneck adapter folder) to ``output`` in the served
    format; the result is validated like an upload and returned."""
    pickles = sorted(p.name for p in source.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles and not (source / HUB_WEIGHTS).is_file():
        raise InvalidAdapter(
            f"{pickles} are pickle checkpoints, which are never loaded; save the adapter with "
            "model.save_adapter(..., use_safetensors=True)",
            param="file",
        )
    if not (source / HUB_WEIGHTS).is_file():
        raise InvalidAdapter(f"{HUB_WEIGHTS} is missing in {source}", param=HUB_WEIGHTS)
    fields = check_hub_config(_hub_config(source))
    tensors: dict[str, Any] = {}
    layers: set[int] = set()
    for key, tensor in load_tensors(source / HUB_WEIGHTS).items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise InvalidAdapter(f"unexpected tensor {key!r} in {HUB_WEIGHTS}", param=HUB_WEIGHTS)
        layer, place, part, kind = m.groups()
        layers.add(int(layer))
        tensors[f"layers.{layer}.{_PLACES[place]}.{part.split('.')[0]}.{kind}"] = tensor.contiguous()
    if not tensors:
        raise InvalidAdapter(f"{HUB_WEIGHTS} holds no bottleneck modules", param=HUB_WEIGHTS)
    size = next(t.shape[0] for k, t in tensors.items() if k.endswith("down.weight"))
    labels = None
    if (source / HUB_HEAD_CONFIG).is_file():
        head, labels = _hub_head(source, spec)
        tensors.update(head)
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "SEQ_CLS" if labels else "CAUSAL_LM",
        "bottleneck_size": int(size),
        "layers": sorted(layers),
        **fields,
    }
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / WEIGHTS_FILE))
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if labels:
        (output / LABELS_FILE).write_text(json.dumps(labels))
    try:
        return load_bottleneck(output, spec)
    except InvalidAdapter:
        for name in (WEIGHTS_FILE, CONFIG_FILE, LABELS_FILE):
            (output / name).unlink(missing_ok=True)
        raise


def _hub_head(source: Path, spec: BaseSpec) -> tuple[dict[str, Any], list[str]]:
    """The served head tensors and labels of an AdapterHub ``classification`` head (see above)."""
    try:
        saved = json.loads((source / HUB_HEAD_CONFIG).read_text())
        config = saved["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidAdapter(f"{HUB_HEAD_CONFIG} is not an AdapterHub head config: {exc}") from exc
    surface = spec.surface
    served = [(module, act) for module, act in surface.head]
    if (
        config.get("head_type") != "classification"
        or config.get("layers") != 2
        or config.get("use_pooler")
        or len(served) != 2
        or config.get("activation_function") != served[0][1]
        or not config.get("bias", True)
    ):
        raise InvalidAdapter(
            f"the head ({config.get('head_type')}, {config.get('layers')} layers, activation "
            f"{config.get('activation_function')}, use_pooler {config.get('use_pooler')}) is not the served "
            f"head of a {surface.family} base: a classification head of 2 layers with activation "
            f"{served[0][1]} on the first token (use_pooler false)",
            param=HUB_HEAD_CONFIG,
        )
    label2id = config.get("label2id") or {}
    labels = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    if sorted(label2id.values()) != list(range(config.get("num_labels", 0))):
        labels = [f"LABEL_{i}" for i in range(int(config.get("num_labels", 0)))]
    layers: dict[str, str] = {}
    tensors: dict[str, Any] = {}
    for key, tensor in load_tensors(source / HUB_HEAD_WEIGHTS).items():
        m = _HEAD_KEY.fullmatch(key)
        if m is None:
            raise InvalidAdapter(f"unexpected tensor {key!r} in {HUB_HEAD_WEIGHTS}", param=HUB_HEAD_WEIGHTS)
        layers.setdefault(m.group(1), "")
        tensors[f"{m.group(1)}.{m.group(2)}"] = tensor
    order = sorted(layers, key=int)  # the Linear layers of the head's Sequential, in order
    if len(order) != 2:
        raise InvalidAdapter(f"{HUB_HEAD_WEIGHTS} holds {len(order)} linear layers; 2 are needed")
    head = {
        f"{module}.{part}": tensors[f"{index}.{part}"].contiguous()
        for (module, _), index in zip(served, order, strict=True)
        for part in ("weight", "bias")
        if f"{index}.{part}" in tensors
    }
    return head, labels
