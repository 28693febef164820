"""Quantization of the base model: its linear layers and token embeddings stored as integers,
every adapter (LoRA, bottleneck, heads) in full precision; int8 and int4 are weight-only
(activations in float), w8a8 also rounds activations.

- ``bf16``: the weights rounded to bfloat16, multiplied by oneDNN's bf16 kernel on CPUs with bf16
  dot products (:mod:`app.models.bf16`).
- ``int8``: per output channel, symmetric (``w ≈ q · s``, q in [-127, 127]).
- ``int4``: group-wise along the input dimension (groups of 32, as llama.cpp's Q4_1 blocks),
  asymmetric in the tinygemm convention (``w ≈ (q - 8) · s + z``, q in [0, 15]); a layer whose
  width is not a multiple of the group stays int8.
- ``w8a8``: int8 weights and int8 activations quantized per row on the fly, smoothed and
  calibrated at load (:mod:`app.models.w8a8`: fbgemm's integer matmul on CPU); not the float
  layer on quantized weights but its own integer layer (adapters still apply exactly on top);
  layers reading the same input share one kernel.
- Token embeddings: bf16 rows for ``bf16``, int8 per row in every other mode (the row of a token
  is what a lookup reads); a language-model head tied to them reads the same rows (w8a8: the head
  is a w8a8 layer; bf16: the same values packed for its kernel).

The layers and their kernels: :mod:`app.models.quantized_layers`.

The classification head modules (what adapters replace) stay in full precision.
:meth:`QuantizedLinear.dequantized` gives the exact weights a layer computes with (the reference
for parity with PEFT, and for training adapters on the weights they are served with).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from app import kernels
from app.models import bf16, w8a8
from app.models.quantized_layers import (
    QuantizedEmbedding,
    QuantizedLinear,
    packed_cpu_kernels,
)
from app.platform import capability

log = logging.getLogger(__name__)

Quantization = Literal["none", "bf16", "int8", "int4", "w8a8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "bf16", "int8", "int4", "w8a8")
Setting = Literal["auto", "none", "bf16", "int8", "int4", "w8a8"]  # ADAPTERSERVE_QUANTIZATION


INT4_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the native step's (app/models/native_step.py)


def resolve(setting: str, device: torch.device, family: str | None = None) -> Quantization:
    """The format ``setting`` stands for on ``device`` for a base of model type ``family``:
    ``auto`` is ``int4`` on a CPU where the native kernels build, for the decoder families whose
    steps run on them end to end (the fastest format there, one stream and many, the demo
    classifiers' held-out accuracy unchanged; docs/quantization.md); else ``bf16`` on a CPU with
    bf16 dot products (AVX-512 BF16 or AMX: half the bytes per step, the hardware's bf16
    matmuls), else ``none`` (a GPU already computes in bf16 under ``ADAPTERSERVE_DTYPE=auto``).
    Training (no family) keeps the float formats: it runs on the weights' float reference."""
    if setting == "auto":
        if device.type == "cpu" and family in INT4_FAMILIES and kernels.q4() is not None:
            return "int4"
        return "bf16" if device.type == "cpu" and capability().bf16_dot else "none"
    assert setting in QUANTIZATIONS, setting
    return setting


def rounds_activations(kind: Quantization, device: torch.device) -> bool:
    """``kind``'s matmuls round their inputs (and outputs) to bf16 or int8 on ``device``: its
    reference is a layer computing as the served one (:func:`snap_to_quantized`), not the float
    layer on its weights."""
    native = kind == "int4" and device.type == "cpu" and kernels.q4() is not None
    return kind in ("bf16", "w8a8") or native or (kind in ("int8", "int4") and packed_cpu_kernels(device))


def _linears(model: nn.Module, keep: tuple[str, ...]) -> list[str]:
    """Names of the linear layers quantizing replaces (not those named in ``keep``)."""
    return [
        name
        for name, mod in model.named_modules()
        if name and type(mod) is nn.Linear and not any(name == k or name.endswith("." + k) for k in keep)
    ]


def _w8a8_kernels(
    model: nn.Module, kind: Quantization, names: list[str], tokenizer: Any, keep_int8: bool = False
) -> dict[str, tuple[w8a8.Kernel, int]]:
    """w8a8's kernels per layer, calibrated through ``tokenizer`` (without one: no smoothing, no
    shared kernels); empty for other kinds."""
    if kind != "w8a8":
        return {}
    calibration = w8a8.calibrate(model, tokenizer, names) if tokenizer is not None else None
    return w8a8.kernels(model, names, calibration, keep_int8)


def quantize_model(
    model: nn.Module, kind: Quantization, keep: tuple[str, ...] = (), tokenizer: Any = None
) -> int:
    """Replace ``model``'s linear layers and token embeddings by quantized ones, in place (modules
    named in ``keep`` stay as they are; w8a8 first reads :data:`~app.models.w8a8.CALIBRATION`
    through ``tokenizer``); return the base's weight bytes afterwards."""
    if kind == "none":
        return weight_bytes(model)
    names = _linears(model, keep)
    parts = _w8a8_kernels(model, kind, names, tokenizer)
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if get_in is not None else None
    head = get_out() if get_out is not None else None
    tied = (
        isinstance(embedding, nn.Embedding)
        and isinstance(head, nn.Linear)
        and head.weight.data_ptr() == embedding.weight.data_ptr()
    )
    replaced: dict[int, nn.Module] = {}  # id(old module) -> its replacement
    if isinstance(embedding, nn.Embedding):
        quantized = QuantizedEmbedding(embedding, kind)
        replaced[id(embedding)] = quantized
        if tied and kind != "w8a8":  # (w8a8: the head is smoothed, so it has weights of its own)
            assert isinstance(head, nn.Linear)
            replaced[id(head)] = quantized.head(head.bias)
    for name, mod in list(model.named_modules()):
        new = replaced.get(id(mod))
        if new is None and name in parts:
            new = replaced[id(mod)] = QuantizedLinear.w8a8_part(mod, *parts[name])
        elif new is None and name in names:
            new = replaced[id(mod)] = QuantizedLinear.of(mod, kind)
        if new is not None and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    for t in [*model.parameters(), *model.buffers()]:  # own copies of what stays float (norms,
        t.data = t.data.clone()  # biases): nothing holds the loaded file's memory any more
    return weight_bytes(model)


@torch.no_grad()
def snap_to_quantized(
    model: nn.Module, kind: Quantization, keep: tuple[str, ...] = (), tokenizer: Any = None
) -> None:
    """Set ``model``'s float weights to exactly the values :func:`quantize_model` would compute
    with (its linear layers, token embeddings and a head tied to them), in place: training on these
    is training on the weights a quantized server is served with (QLoRA-style; gradients flow
    through the float copies). ``w8a8`` also quantizes activations: its linear layers become
    :class:`~app.models.w8a8.W8A8Linear` (the served layer, with a straight-through gradient)."""
    if kind == "none":
        return
    names = _linears(model, keep)
    parts = _w8a8_kernels(model, kind, names, tokenizer, keep_int8=True)
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if get_in is not None else None
    tied_ptr = embedding.weight.data_ptr() if isinstance(embedding, nn.Embedding) else None
    for name in names:
        mod = model.get_submodule(name)
        assert isinstance(mod, nn.Linear)
        tied = mod.weight.data_ptr() == tied_ptr
        new: nn.Linear | None = None
        if kind == "w8a8":
            kernel, part = parts[name]
            new = w8a8.W8A8Linear(kernel, mod.bias, part).to(mod.weight.device)
        elif kind == "bf16":  # (a head tied to the embeddings gets weights of its own: the same values)
            new = bf16.BF16Linear.of(mod)
        else:  # int8/int4: the served layer's own reference (activations rounded as it rounds them)
            served = (
                QuantizedEmbedding(embedding, kind).head(None)
                if tied and isinstance(embedding, nn.Embedding)
                else QuantizedLinear.of(mod, kind)
            )
            new = served.reference(mod)
            if new is None and not tied:  # (a head tied to the embeddings: snapped with them)
                mod.weight.copy_(served.dequantized())
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if isinstance(embedding, nn.Embedding):
        embedding.weight.copy_(QuantizedEmbedding(embedding, kind).dequantized())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights (parameters and buffers, shared tensors once; and the
    weights packed for fbgemm and oneDNN)."""
    seen: set[int] = set()
    total = sum(
        m.in_features * m.out_features + 4 * m.out_features
        for m in model.modules()
        if isinstance(m, w8a8.Kernel) and m.packed is not None
    )
    total += sum(
        2 * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, QuantizedLinear) and m.onednn is not None
    )
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
