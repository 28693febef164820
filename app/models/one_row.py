"""One decode step of one row, without transformers' per-layer plumbing.

A person talking to a chatbot is one row decoding one token at a time. At one row, the weights'
matmuls are a minority of a step on a CPU: transformers' decoder layers spend the rest on module
calls, keyword plumbing, mask building and cache bookkeeping (on 2 cores, the default base in int4:
19.3 ms a step through transformers against 12.1 ms for the same operations called directly,
~5 ms of which are the matmuls). :class:`OneRowDecoder` runs the step of the llama-like families
(llama, mistral, qwen2, qwen3) directly: it calls the model's own projection modules (so every
weight format and adapter kind, routed as for any batch, applies unchanged), its rotary embedding
and norms, appends to the engine's KV cache layers and attends with PyTorch's SDPA. The result is
the same computation as the model's forward (the parity tests compare the two).

It applies to a batch of exactly one row whose cache has no padding; anything else runs the
model's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from app.models.multi_lora import MultiLoraLinear
from app.models.quantized_layers import QuantizedLinear

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the layer layout this step implements


class _Projection:
    """One projection of a layer: its module (a :class:`MultiLoraLinear` in the engine), and the
    base's matmul called directly where it is a plain one: float weights, or a format computing
    on bf16 rows (``rounds``: its input rounded once for the projections that read it)."""

    __slots__ = ("bias", "kernel", "lora", "module", "rounds")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.lora = module if isinstance(module, MultiLoraLinear) else None
        base = self.lora.base if self.lora is not None else module
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.bias: torch.Tensor | None = None
        self.rounds = False
        if isinstance(base, QuantizedLinear):
            self.kernel, self.bias = base.bf16_kernel(), base.bias
            self.rounds = self.kernel is not None
        elif type(base) is nn.Linear:
            weight, bias = base.weight, base.bias
            self.kernel = lambda x: F.linear(x, weight, bias)

    def __call__(self, x: torch.Tensor, x16: torch.Tensor | None, slot: int) -> torch.Tensor:
        """The projection of ``x`` [1, in] (``x16``: the same in bf16 where it rounds) for
        adapter ``slot`` (routed by the caller, for the general path)."""
        lora, kernel = self.lora, self.kernel
        if kernel is None or (lora is not None and (lora.scales is not None or lora.bottleneck)):
            out: torch.Tensor = self.module(x.unsqueeze(0))
            return out.view(1, -1)
        if self.rounds:
            y = kernel(x.to(torch.bfloat16) if x16 is None else x16).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = kernel(x)
        if lora is not None and slot in lora.ranks:
            a_t, b_t = lora.alone(slot)
            y = y.addmm_(torch.mm(x, a_t), b_t)
        return y


@dataclass(frozen=True)
class _Layer:
    input_norm: nn.Module
    q: _Projection
    k: _Projection
    v: _Projection
    o: _Projection
    q_norm: nn.Module | None  # qwen3 normalizes each head of q and k
    k_norm: nn.Module | None
    post_norm: nn.Module
    gate: _Projection
    up: _Projection
    down: _Projection
    act: nn.Module
    scaling: float

    @property
    def rounds(self) -> bool:
        return self.q.rounds


class OneRowDecoder:
    """The decode step of one row for a llama-like model (see the module docstring)."""

    def __init__(self, model: Any) -> None:  # a transformers model of one of FAMILIES
        backbone, config = model.model, model.config
        self.embed: nn.Module = backbone.embed_tokens
        self.rotary: nn.Module = backbone.rotary_emb
        self.norm: nn.Module = backbone.norm
        self.head: nn.Module = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm,
                q=_Projection(layer.self_attn.q_proj),
                k=_Projection(layer.self_attn.k_proj),
                v=_Projection(layer.self_attn.v_proj),
                o=_Projection(layer.self_attn.o_proj),
                q_norm=getattr(layer.self_attn, "q_norm", None),
                k_norm=getattr(layer.self_attn, "k_norm", None),
                post_norm=layer.post_attention_layernorm,
                gate=_Projection(layer.mlp.gate_proj),
                up=_Projection(layer.mlp.up_proj),
                down=_Projection(layer.mlp.down_proj),
                act=layer.mlp.act_fn,
                scaling=float(layer.self_attn.scaling),
            )
            for layer in backbone.layers
        ]

    @classmethod
    def of(cls, model: nn.Module) -> OneRowDecoder | None:
        """The step for ``model``, or None when its family's layers are laid out otherwise."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in FAMILIES:
            return None
        return cls(model)

    def applies(self, cache: DynamicCache, mask: torch.Tensor) -> bool:
        """Whether a batch with this cache and mask [rows, columns] is one this step can run: one
        row with no padding column. (A sliding-window layer returns the keys and values of its
        window and the new token: attending to all of them is the window.)"""
        if mask.shape[0] != 1 or len(cache.layers) != len(self.layers):
            return False
        return bool(mask.all())

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, slot: int
    ) -> torch.Tensor:
        """Logits [1, vocab] of the token ``ids`` [1, 1] at ``positions`` [1, 1] for adapter
        ``slot`` (routed by the caller), its keys and values appended to ``cache``."""
        h = self.embed(ids).view(1, -1)  # [1, hidden]
        cos, sin = self.rotary(h, positions)  # [1, 1, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        gqa = heads != kv_heads
        bf16 = torch.bfloat16
        kv: Any  # the engine's cache layers (app/engine/kv_cache.py)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            rounds = layer.rounds
            x = layer.input_norm(h)
            x16 = x.to(bf16) if rounds else None
            q = layer.q(x, x16, slot).view(1, 1, heads, dim)
            k = layer.k(x, x16, slot).view(1, 1, kv_heads, dim)
            v = layer.v(x, x16, slot).view(1, kv_heads, 1, dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q = _rotated(q.view(1, heads, 1, dim), cos, sin)
            k = _rotated(k.view(1, kv_heads, 1, dim), cos, sin)
            keys, values = kv.update(k, v)
            attn = F.scaled_dot_product_attention(q, keys, values, scale=layer.scaling, enable_gqa=gqa)
            a = attn.view(1, heads * dim)
            h = h + layer.o(a, a.to(bf16) if rounds else None, slot)
            x = layer.post_norm(h)
            x16 = x.to(bf16) if rounds else None
            m = layer.act(layer.gate(x, x16, slot)) * layer.up(x, x16, slot)
            h = h + layer.down(m, m.to(bf16) if rounds else None, slot)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as transformers' ``apply_rotary_pos_emb`` applies it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
