"""What the server knows of each base-model family, in one place (as vLLM's model registry and
PEFT's target-module mapping do): which modules adapters may target, where bottleneck modules sit,
how a sequence is pooled for classification, the classification head PEFT saves for the family,
whether the base can generate and how its weights load.

A base whose family is not listed here is refused at start, with the list of the families that
are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.errors import AdapterServeError


class UnsupportedBase(AdapterServeError):
    """The configured base model's family cannot be served (raised at start)."""

    type = "unsupported_base"


@dataclass(frozen=True)
class ModelSurface:
    """One family's surface, as the engine and the adapter validators see it."""

    family: str  # transformers' ``model_type``
    kind: Literal["decoder", "encoder"]
    # linear modules adapters may target (suffixes of module names, as PEFT's target_modules)
    lora_targets: tuple[str, ...]
    # the layers whose output a bottleneck module follows, before the residual add (and, in
    # post-LayerNorm blocks, before the LayerNorm): names after the block prefix ``<blocks>.<i>.``
    attention_output: str
    ffn_output: str
    pooling: Literal["last", "first"]  # last non-pad token (decoders), [CLS] / <s> (encoders)
    # the classification head as PEFT saves it (modules_to_save): module names, each followed by an
    # activation (None after the last one, which maps to the labels). Layers an adapter does not
    # carry run as the base's own module (BERT's pooler).
    head: tuple[tuple[str, str | None], ...]
    can_generate: bool
    blocks: str = "layers"  # the container of the transformer blocks (``layers``, ``layer``, ``h``)
    conv1d: bool = False  # projections are transformers' Conv1D ([in, out] weights: fan_in_fan_out)
    reserved_positions: int = 0  # position ids a sequence cannot use (RoBERTa counts from pad + 1)

    @property
    def head_modules(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.head)


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _decoder(family: str, targets: tuple[str, ...] = _LLAMA_LIKE) -> ModelSurface:
    return ModelSurface(
        family=family,
        kind="decoder",
        lora_targets=targets,
        attention_output="self_attn.o_proj",
        ffn_output="mlp.down_proj",
        pooling="last",
        head=(("score", None),),
        can_generate=True,
    )


_BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def _encoder(family: str, head: tuple[tuple[str, str | None], ...], reserved: int = 0) -> ModelSurface:
    return ModelSurface(
        family=family,
        kind="encoder",
        lora_targets=_BERT_TARGETS,
        attention_output="attention.output.dense",
        ffn_output="output.dense",
        pooling="first",
        head=head,
        can_generate=False,
        blocks="layer",
        reserved_positions=reserved,
    )


_ROBERTA_HEAD = (("classifier.dense", "tanh"), ("classifier.out_proj", None))

SURFACES: dict[str, ModelSurface] = {
    s.family: s
    for s in (
        _decoder("llama"),
        _decoder("mistral"),
        _decoder("qwen2"),
        _decoder("qwen3"),
        _decoder("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
        _decoder("gemma3_text"),
        ModelSurface(
            family="gpt2",
            kind="decoder",
            lora_targets=("c_attn", "c_proj", "c_fc"),
            attention_output="attn.c_proj",
            ffn_output="mlp.c_proj",
            pooling="last",
            head=(("score", None),),
            can_generate=True,
            blocks="h",
            conv1d=True,
        ),
        _encoder("bert", (("bert.pooler.dense", "tanh"), ("classifier", None))),
        _encoder("roberta", _ROBERTA_HEAD, reserved=2),
        _encoder("xlm-roberta", _ROBERTA_HEAD, reserved=2),
        _encoder("electra", (("classifier.dense", "gelu"), ("classifier.out_proj", None))),
        ModelSurface(
            family="distilbert",
            kind="encoder",
            lora_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
            attention_output="attention.out_lin",
            ffn_output="ffn.lin2",
            pooling="first",
            head=(("pre_classifier", "relu"), ("classifier", None)),
            can_generate=False,
            blocks="layer",
        ),
    )
}


def served_families() -> list[str]:
    return sorted(SURFACES)


def surface_for(model_type: str) -> ModelSurface:
    """The surface of a base whose config says ``model_type``; :class:`UnsupportedBase` when the
    server does not know the family (the message lists the families it serves)."""
    surface = SURFACES.get(model_type)
    if surface is None:
        raise UnsupportedBase(
            f"base models of the family {model_type!r} are not supported; supported: "
            f"{', '.join(served_families())}",
            param="base_model",
        )
    return surface
