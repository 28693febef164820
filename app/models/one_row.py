"""The forward of one row (a decode step, or a prefill chunk), without transformers' plumbing.

A person talking to a chatbot is one row decoding one token at a time. At one row, the weights'
matmuls are a minority of a step on a CPU: transformers' decoder layers spend the rest on module
calls, keyword plumbing, mask building and cache bookkeeping (on 2 cores, the default base in int4:
19.3 ms a step through transformers against 12.1 ms for the same operations called directly,
~5 ms of which are the matmuls). :class:`OneRowDecoder` runs the step of the llama-like families
(llama, mistral, qwen2, qwen3) directly: it calls the model's own projection modules (so every
weight format and adapter kind, routed as for any batch, applies unchanged), its rotary embedding
and norms, appends to the engine's KV cache layers and attends with PyTorch's SDPA. The result is
the same computation as the model's forward (the parity tests compare the two).

It applies to decode steps (one new token for each row of a batch, left-padded rows attending
under the batch's mask: one stream, or a busy service's whole batch, where the same plumbing is
paid per layer whatever the rows) and to the prefill of one row whose cache has no padding (one
new prompt: the first token of a chat turn); anything else (several rows prefilling several
tokens) runs the model's forward. Rows of one adapter take the direct kernels and the group's
fused LoRA; rows of several LoRA adapters the base kernels and all the adapters side by side for
the group; IA³, DoRA and bottleneck rows the layers' routed modules
(``app/models/projection_groups.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from app.models.native_step import NativeStep
from app.models.projection_groups import Group
from app.platform import return_freed_memory

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the layer layout this step implements


@dataclass(frozen=True)
class _Layer:
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Group
    o: Group
    q_norm: nn.Module | None  # qwen3 normalizes each head of q and k
    k_norm: nn.Module | None
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Group
    down: Group
    act: nn.Module
    scaling: float


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _norm(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``, or in float32 PyTorch's fused RMS norm with its weight and epsilon: the same
    values (normalized in float32, then scaled), one operation instead of six."""
    if type(module).__name__ not in RMS_NORMS or dtype != torch.float32:
        return module
    weight, eps = module.weight, float(cast(float, module.variance_epsilon))
    assert isinstance(weight, torch.Tensor)
    shape = (int(weight.shape[0]),)
    return lambda x: F.rms_norm(x, shape, weight, eps)


class OneRowDecoder:
    """The decode step of one row for a llama-like model (see the module docstring)."""

    def __init__(self, model: Any, native: bool = True) -> None:  # a model of one of FAMILIES
        backbone, config = model.model, model.config
        dtype = next(backbone.norm.parameters()).dtype
        self.embed: nn.Module = backbone.embed_tokens
        self.rotary: nn.Module = backbone.rotary_emb
        self.norm = _norm(backbone.norm, dtype)
        self.head: nn.Module = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    input_norm=_norm(layer.input_layernorm, dtype),
                    qkv=Group([attn.q_proj, attn.k_proj, attn.v_proj]),
                    o=Group([attn.o_proj]),
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                    post_norm=_norm(layer.post_attention_layernorm, dtype),
                    gate_up=Group([mlp.gate_proj, mlp.up_proj]),
                    down=Group([mlp.down_proj]),
                    act=mlp.act_fn,
                    scaling=float(attn.scaling),
                )
            )
        if any(layer.qkv.kernel is not None or layer.gate_up.kernel is not None for layer in self.layers):
            return_freed_memory()  # the layers' weights before they were laid end to end
        # an int4 base's decode steps on our kernels end to end (app/models/native_step.py)
        self.native = NativeStep.of(self, model) if native else None

    @classmethod
    def of(cls, model: nn.Module, native: bool = True) -> OneRowDecoder | None:
        """The step for ``model``, or None when its family's layers are laid out otherwise
        (``native``: an int4 base's decode steps on the native kernels where they apply)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in FAMILIES:
            return None
        return cls(model, native)

    def drop_batch_copies(self) -> None:
        """Free every group's copies of a mixed batch's adapters (the engine, when it goes idle)."""
        for layer in self.layers:
            for group in (layer.qkv, layer.o, layer.gate_up, layer.down):
                group.drop_batch_copies()

    def applies(self, cache: DynamicCache, mask: torch.Tensor, tokens: int) -> bool:
        """Whether a batch with this cache and mask [rows, columns] is one this step can run for
        ``tokens`` new tokens: one token for each of any number of rows (decode steps, padding
        included); several new tokens for one row with no padding column, over full-attention
        layers only. (For one token, a sliding-window layer returns the keys and values of its
        window and the new token: attending to all of them is the window.)"""
        layers = cache.layers
        if len(layers) != len(self.layers):
            return False
        full = next(
            (
                layer
                for layer in layers
                if isinstance(layer, DynamicLayer) and not isinstance(layer, DynamicSlidingWindowLayer)
            ),
            None,
        )
        if full is not None and full.get_seq_length() + tokens != mask.shape[1]:
            return False  # (the mask covers the cached columns and the new ones, as the model reads it)
        if tokens == 1:
            return True
        if mask.shape[0] != 1 or any(isinstance(layer, DynamicSlidingWindowLayer) for layer in layers):
            return False
        return bool(mask.all())

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        slot: int | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] after the tokens ``ids`` [rows, n] at ``positions`` [rows, n]
        (several rows: one token each) for adapter ``slot`` (None: each row its own, as the
        caller routed them), their keys and values appended to ``cache``; ``mask`` [rows, columns]:
        the batch's attention mask over the cached columns and the new ones (None: no padding)."""
        rows, n = ids.shape
        native = self.native
        if (n == 1 or rows == 1) and native is not None and native.applies(cache, slot):
            return native(ids, positions, cache, slot, mask)
        h = self.embed(ids).view(rows * n, -1)  # [rows x n, hidden]
        cos, sin = self.rotary(h, positions)  # [rows, n, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        gqa = heads != kv_heads
        padding = None if mask is None or bool(mask.all()) else mask.bool()[:, None, None, :]
        causal = None if n == 1 else _causal(cache, n, h.device)
        # one new token a row: its rotation as a [dim, dim] matrix a row, made once for every layer
        # (one batched matmul of the heads instead of the six operations of the elementwise form)
        rotation = _rotation(cos, sin) if n == 1 else None
        kv: Any  # the engine's cache layers (app/engine/kv_cache.py)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            q, k, v = layer.qkv(layer.input_norm(h), slot, rows)
            q, k, v = (_heads(x, rows, c, dim) for x, c in ((q, heads), (k, kv_heads), (v, kv_heads)))
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            if rotation is None:
                q, k = _rotated(q, cos, sin), _rotated(k, cos, sin)
            else:
                q = torch.bmm(q.reshape(rows, heads, dim), rotation).view(rows, heads, 1, dim)
                k = torch.bmm(k.reshape(rows, kv_heads, dim), rotation).view(rows, kv_heads, 1, dim)
            keys, values = kv.update(k, v)
            seen = causal if padding is None else padding[..., -keys.shape[2] :]
            if n == 1 and gqa:  # each key/value head's queries as its "tokens", as transformers packs
                # them for a decode step: every cached key and value is read once, not once a head
                out = F.scaled_dot_product_attention(
                    q.reshape(rows, kv_heads, heads // kv_heads, dim),
                    keys,
                    values,
                    attn_mask=seen,
                    scale=layer.scaling,
                )
                attn = out.reshape(rows, heads, 1, dim)
            else:
                attn = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=seen, scale=layer.scaling, enable_gqa=gqa
                )
            (o,) = layer.o(attn.transpose(1, 2).reshape(rows * n, heads * dim), slot, rows)
            h = h + o
            gate, up = layer.gate_up(layer.post_norm(h), slot, rows)
            (down,) = layer.down(layer.act(gate) * up, slot, rows)
            h = h + down
        logits: torch.Tensor = self.head(self.norm(h.view(rows, n, -1)[:, -1]))
        return logits


def _heads(x: torch.Tensor, rows: int, heads: int, dim: int) -> torch.Tensor:
    """[rows x n, heads x dim] as [rows, heads, n, dim] (a view)."""
    return x.view(rows, -1, heads, dim).transpose(1, 2)


def _causal(cache: DynamicCache, n: int, device: torch.device) -> torch.Tensor:
    """[n, past + n]: new token i sees the cached tokens and the new ones up to itself."""
    past = cache.get_seq_length()
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of one token a row as matrices [rows, dim, dim]: ``x @ R`` is
    ``x * cos + rotate_half(x) * sin`` (``R = diag(cos) + P diag(sin)``, ``x @ P`` = rotate_half(x);
    each output is the same two products summed, the other terms exact zeros)."""
    cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)  # [rows, dim]
    dim, half = cos.shape[1], cos.shape[1] // 2
    swap = cos.new_zeros(dim, dim)
    swap[half:, :half] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    swap[:half, half:] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    return torch.diag_embed(cos) + swap * sin.unsqueeze(1)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as transformers' ``apply_rotary_pos_emb`` applies it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
