"""What the server knows of each base-model family, in one place (as vLLM's model registry and
PEFT's target-module mapping do): which modules adapters may target, where bottleneck modules sit,
how a sequence is pooled for classification and whether the base can generate.

A base whose family is not listed here is refused at start, with the list of the families that
are; ``served`` says which families the engine serves today, the others are refused with the
reason (``why_not``) instead of being served wrongly.
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
    # the linear layers whose output a bottleneck module follows (suffix after ``layers.<i>.``)
    attention_output: str
    ffn_output: str
    pooling: Literal["last", "first"]  # last non-pad token (decoders), [CLS] (encoders)
    can_generate: bool
    served: bool = True
    why_not: str = ""  # why a listed family is not served yet


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _decoder(family: str, targets: tuple[str, ...] = _LLAMA_LIKE) -> ModelSurface:
    return ModelSurface(
        family=family,
        kind="decoder",
        lora_targets=targets,
        attention_output="self_attn.o_proj",
        ffn_output="mlp.down_proj",
        pooling="last",
        can_generate=True,
    )


def _encoder(family: str, targets: tuple[str, ...], attention: str, ffn: str) -> ModelSurface:
    return ModelSurface(
        family=family,
        kind="encoder",
        lora_targets=targets,
        attention_output=attention,
        ffn_output=ffn,
        pooling="first",
        can_generate=False,
        served=False,
        why_not="encoder bases (pooled [CLS] classification, post-LayerNorm bottleneck sites) are not "
        "served yet; use a decoder base",
    )


_BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")

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
            can_generate=True,
            served=False,
            why_not="GPT-2's attention and MLP are Conv1D layers, which the multi-adapter layers do not "
            "wrap yet",
        ),
        _encoder("bert", _BERT_TARGETS, "attention.output.dense", "output.dense"),
        _encoder("roberta", _BERT_TARGETS, "attention.output.dense", "output.dense"),
        _encoder("xlm-roberta", _BERT_TARGETS, "attention.output.dense", "output.dense"),
        _encoder(
            "distilbert",
            ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
            "attention.out_lin",
            "ffn.lin2",
        ),
    )
}


def served_families() -> list[str]:
    return sorted(f for f, s in SURFACES.items() if s.served)


def surface_for(model_type: str) -> ModelSurface:
    """The surface of a base whose config says ``model_type``; :class:`UnsupportedBase` when the
    server does not know the family or cannot serve it yet (the message lists what it serves)."""
    families = ", ".join(served_families())
    surface = SURFACES.get(model_type)
    if surface is None:
        raise UnsupportedBase(
            f"base models of the family {model_type!r} are not supported; supported: {families}",
            param="base_model",
        )
    if not surface.served:
        raise UnsupportedBase(
            f"base models of the family {model_type!r} cannot be served: {surface.why_not} "
            f"(served: {families})",
            param="base_model",
        )
    return surface
