"""A decode step of an ``int4`` base on our CPU kernels end to end (app/kernels): one new token
for each row, every layer in four native calls and the attention in a fifth.

The lean step (app/models/one_row.py) still spends more than half of a one-row int4 step outside
the weights' matmuls: ~600 small PyTorch operations (RMS norms as six operations each, rotary
embedding, cache appends, SDPA's set-up, SwiGLU, residual adds), each a few microseconds of
dispatch at one row. Here each layer is

    qkv  = W_qkv · rmsnorm(h)                  (norm, 8-bit rounding and matmul in one call)
    attn = attention(rotary(q), rotary(k), v)  (the new key and value written into the cache)
    h   += W_o · attn                          (the residual added by the matmul's store)
    gu   = W_gate_up · rmsnorm(h)
    h   += W_down · (silu(gate) · up)

and each row's LoRA deltas are added between the calls from the rows each call multiplied (the
normalized rows, the SwiGLU rows) by a native kernel that reads the adapters' A and B where the
slots hold them (no copies gathered per batch; once per run of rows of one adapter; one adapter on
every row, or rows of many: app/models/projection_groups.py). It runs where every projection of
every layer is on our kernel, the model computes in float32 with RMS norms and SwiGLU (llama,
mistral, qwen2, qwen3), the cache's layers all grow in place (no sliding windows) and no row's
adapter needs its modules (bottleneck, IA³, DoRA); elsewhere the lean step runs as before. Same
computation, rounded in another order: the parity tests hold it to the int4 tolerance against the
model's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from app import kernels
from app.engine.kv_cache import GrowingLayer
from app.models.projection_groups import Group
from app.models.routing import BASE_SLOT

if TYPE_CHECKING:
    from transformers import DynamicCache

    from app.models.one_row import OneRowDecoder

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
MAX_HEAD_DIM = 512  # (the attention's buffers on the stack)
MAX_GROUP = 8  # query heads per key/value head


def _no_deltas(group: Group) -> None:
    return None


def _norm(module: nn.Module | None) -> tuple[torch.Tensor, float] | None:
    """An RMS norm's float32 weight and epsilon (None: not a float32 RMS norm)."""
    if module is None or type(module).__name__ not in RMS_NORMS:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
        return None
    return weight.detach().contiguous(), float(getattr(module, "variance_epsilon", 1e-6))


def _silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


@dataclass(frozen=True)
class _Layer:
    groups: tuple[Group, Group, Group, Group]  # qkv, o, gate_up, down
    weights: tuple[Weights, Weights, Weights, Weights]
    input_norm: tuple[torch.Tensor, float]
    post_norm: tuple[torch.Tensor, float]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    head_eps: float
    scaling: float


class NativeStep:
    """The decode step of :class:`OneRowDecoder`'s model on the native kernels (see the module
    docstring); built by :meth:`of` where it applies."""

    def __init__(
        self,
        kernel: kernels.Q4,
        decoder: OneRowDecoder,
        layers: list[_Layer],
        head: tuple[tuple[torch.Tensor, float], Group | None],
    ) -> None:
        self.kernel = kernel
        self.decoder = decoder
        self.layers = layers
        self.norm, self.head = head  # the final norm; the LM head on the kernel (or None)
        lora = next((p.lora for g in layers[0].groups for p in g.parts if p.lora is not None), None)
        self.ctx = None if lora is None else lora.ctx  # the rows' adapters (mixed batches)
        self.groups = [g for layer in layers for g in layer.groups] + ([self.head] if self.head else [])

    @classmethod
    def of(cls, decoder: OneRowDecoder, model: Any) -> NativeStep | None:
        """The native step of ``decoder`` (the model's lean step), or None where it does not apply."""
        kernel = kernels.q4()
        dim, heads, kv_heads = decoder.head_dim, decoder.heads, decoder.kv_heads
        if kernel is None or dim % 16 or dim > MAX_HEAD_DIM:
            return None
        if heads % kv_heads or heads // kv_heads > MAX_GROUP:
            return None
        layers = []
        for lean, layer in zip(decoder.layers, model.model.layers, strict=True):
            groups = (lean.qkv, lean.o, lean.gate_up, lean.down)
            weights = [g.native for g in groups]
            input_norm, post_norm = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
            q_norm, k_norm = _norm(lean.q_norm), _norm(lean.k_norm)
            if (
                any(w is None for w in weights)
                or input_norm is None
                or post_norm is None
                or (lean.q_norm is not None and (q_norm is None or k_norm is None))
                or not _silu(lean.act)
            ):
                return None
            layers.append(
                _Layer(
                    groups,
                    (weights[0], weights[1], weights[2], weights[3]),  # type: ignore[arg-type]
                    input_norm,
                    post_norm,
                    None if q_norm is None else q_norm[0],
                    None if k_norm is None else k_norm[0],
                    1e-6 if q_norm is None else q_norm[1],
                    lean.scaling,
                )
            )
        norm, head = _norm(model.model.norm), Group([model.lm_head])
        if norm is None:
            return None
        return cls(kernel, decoder, layers, (norm, head if head.native is not None else None))

    @property
    def bf16_cache(self) -> bool:
        """Whether caches keep their keys and values in bf16 for this step: its attention runs on
        bf16 dot products (``avx512_bf16``; a head of a multiple of 32 up to 256), which rounds them
        so as it reads them anyway."""
        dim = self.decoder.head_dim
        return self.kernel.bf16 and dim % 32 == 0 and dim <= 256

    def applies(self, cache: DynamicCache, slot: int | None) -> bool:
        """Whether this decode step (one token a row) runs here for ``slot`` (None: each row's
        own, as routed): the cache's layers all grow in place in float32 (or bf16:
        :attr:`bf16_cache`), and every group is the base's product plus LoRA deltas for these rows."""
        if not all(type(layer) is GrowingLayer for layer in cache.layers):
            return False
        dtype = cast(GrowingLayer, cache.layers[0]).key_dtype()
        if dtype is not None and dtype != torch.float32 and not (dtype == torch.bfloat16 and self.bf16_cache):
            return False
        if slot == BASE_SLOT:
            return True
        routing = self.ctx.routing if self.ctx is not None else None
        if routing is None:
            return False
        slots = {slot} if slot is not None else set(routing.slots)
        return all(group.rows_plain(slots) for group in self.groups)

    def _deltas(self, tokens: int) -> Callable[[Group], kernels.LoraTable | None]:
        """Where a group's LoRA weights are for the rows (each row's adapter's: one for all rows,
        or mixed rows), for the native kernel to add the rows' deltas in the group's matmul,
        reading the adapters' weights where they are, once per run of rows of one adapter
        (``tokens``: each row's tokens in the matmuls' rows)."""
        routing = self.ctx.routing if self.ctx is not None else None
        assert self.ctx is not None and routing is not None
        slots = routing.slots if tokens == 1 else [s for s in routing.slots for _ in range(tokens)]
        rows = (self.ctx.generation, tuple(slots))  # (made once a step: each group compares it)
        return lambda group: group.row_table(rows)

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        slot: int | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] after the tokens ``ids`` [rows, n] at ``positions``: one token a
        row, or several of one row without padding (a prefill chunk; its last token's logits);
        as :meth:`OneRowDecoder.__call__`."""
        d, k = self.decoder, self.kernel
        batch, n = ids.shape
        rows = batch * n  # the matmuls' rows: a row's token each, or one row's tokens
        h = d.embed(ids).reshape(rows, -1).float().contiguous()
        cos, sin = d.rotary(h, positions)
        rotary = (cos.reshape(rows, -1).float().contiguous(), sin.reshape(rows, -1).float().contiguous())
        heads, kv_heads, dim = d.heads, d.kv_heads, d.head_dim
        causal = n > 1
        seen = None if causal or mask is None or bool(mask.all()) else mask.to(torch.uint8).contiguous()
        add = self._deltas(n) if slot != BASE_SLOT else _no_deltas
        qkv_w, _, gu_w, _ = self.layers[0].weights
        qkv = torch.empty(rows, qkv_w[1].shape[0] * kernels.TILE)
        attn = torch.empty(rows, heads * dim)
        gu = torch.empty(rows, gu_w[1].shape[0] * kernels.TILE)
        column = h.new_empty(batch, kv_heads, n, dim)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            (qkv_w, o_w, gu_w, down_w), (g_qkv, g_o, g_gu, g_down) = layer.weights, layer.groups
            k.linear(h, *qkv_w, qkv, norm=layer.input_norm, lora=add(g_qkv))
            assert isinstance(kv, GrowingLayer)
            buffers = kv.reserve(column)
            norms = (layer.q_norm, layer.k_norm, layer.head_eps)
            k.attend(qkv, (heads, kv_heads, dim), rotary, norms, buffers, seen, layer.scaling, attn, causal)
            k.linear(attn, *o_w, h, accumulate=True, lora=add(g_o))
            k.linear(h, *gu_w, gu, norm=layer.post_norm, lora=add(g_gu))
            k.linear(gu, *down_w, h, swiglu=True, accumulate=True, lora=add(g_down))
        if causal:  # the last token's logits
            h, add = h[-1:], self._deltas(1) if slot != BASE_SLOT else _no_deltas
        head = self.head
        if head is None or head.native is None:
            logits: torch.Tensor = d.head(d.norm(h))
            return logits
        packed, scales, bias = head.native
        out = torch.empty(batch, scales.shape[0] * kernels.TILE)
        k.linear(h, packed, scales, bias, out, norm=self.norm, lora=add(head))
        return out
