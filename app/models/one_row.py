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
the group (:meth:`_Group._mixed`); IA³, DoRA and bottleneck rows the layers' routed modules.
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

from app.models.multi_lora import MultiLoraLinear
from app.models.quantized_layers import QuantizedLinear
from app.platform import return_freed_memory

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

    def general(self, slot: int | None) -> bool:
        """Whether this projection must run its module for adapter ``slot`` (no direct kernel,
        rows of several adapters: None, or IA³/DoRA scales or a bottleneck module of the slot's
        in this layer)."""
        if self.kernel is None or slot is None:
            return True
        lora = self.lora
        if lora is None:
            return False
        scales, bottleneck = lora.scales, lora.bottleneck
        return (scales is not None and slot in scales.uses) or (
            bottleneck is not None and slot in bottleneck.sizes
        )

    def __call__(
        self, x: torch.Tensor, x16: torch.Tensor | None, slot: int | None, rows: int
    ) -> torch.Tensor:
        """The projection of ``x`` [rows x n, in] (``x16``: the same in bf16 where it rounds) for
        adapter ``slot`` (the general path: the module, routed by the caller, on [rows, n, in])."""
        kernel = self.kernel
        if kernel is None or self.general(slot):
            out: torch.Tensor = self.module(x.view(rows, -1, x.shape[-1]))
            return out.view(x.shape[0], -1)
        if self.rounds:
            y = kernel(x.to(torch.bfloat16) if x16 is None else x16).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = kernel(x)
        assert slot is not None
        self.add_lora(x, y, slot)
        return y

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> None:
        """Add ``slot``'s LoRA delta of ``x`` to ``y`` [n, out] (a view is fine), in place."""
        lora = self.lora
        if lora is not None and slot in lora.ranks:
            a_t, b_t = lora.alone(slot)
            y.addmm_(torch.mm(x, a_t), b_t)


class _Group:
    """The projections of a layer that read the same input (q, k, v; gate, up; o; down). Where
    their bases are int8 or int4 on the packed CPU kernels, whose packing is one row of the
    weights after another, their weights are laid end to end once (each layer's own weights
    become a view of that: no second copy) and one matmul computes them all; a LoRA adapter's
    deltas then take two matmuls for the group too (its A side by side, its B block-diagonal)."""

    __slots__ = ("bias", "bounds", "kernel", "lora", "mask", "mixed", "parts", "rounds")

    def __init__(self, modules: list[nn.Module]) -> None:
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.bias: torch.Tensor | None = None
        self.bounds: list[tuple[int, int]] = []
        if len(modules) > 1:
            _fuse(self, modules)
        self.parts = [_Projection(m) for m in modules]  # (after _fuse: the kernels read the views)
        self.rounds = self.parts[0].rounds
        # the last adapter's weights for the group: (its parts' A^T, as the layers keep them; A^T
        # side by side [in, ranks]; B^T block-diagonal [ranks, outs])
        self.lora: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        # a mixed batch's adapters for the whole group: (the parts' side-by-side A^T, as the layers
        # keep them; A^T [in, Σ ranks], B^T block-diagonal [Σ ranks, Σ outs]) and the last mask
        # (the parts' masks, as kept for the decode steps of one composition of rows; the mask)
        self.mixed: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self.mask: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, slot: int | None, rows: int) -> list[torch.Tensor]:
        """Each projection of ``x`` [rows x n, in] for adapter ``slot`` (None: the rows' own)."""
        parts = self.parts
        if self.kernel is not None and slot is not None and not any(p.general(slot) for p in parts):
            y = self.kernel(x.to(torch.bfloat16)).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            weights = self._lora(slot)
            if weights is not None:
                y.addmm_(torch.mm(x, weights[0]), weights[1])
            return [y[:, a:b] for a, b in self.bounds]
        x16 = x.to(torch.bfloat16) if self.rounds else None
        if slot is None and x.shape[0] == rows:
            mixed = self._mixed(x, x16)
            if mixed is not None:
                return mixed
        return [part(x, x16, slot, rows) for part in parts]

    def _mixed(self, x: torch.Tensor, x16: torch.Tensor | None) -> list[torch.Tensor] | None:
        """A decode step of rows of several adapters (one token a row): each base's kernel on the
        rows, and the adapters' LoRA deltas of the whole group in two matmuls and a row mask (the
        batch's adapters side by side, as :meth:`MultiLoraLinear.concatenated` lays them for one
        layer); None where a part needs its module (no direct kernel, IA³/DoRA scales, bottleneck
        modules, or more adapters than run side by side)."""
        parts = self.parts
        lora = parts[0].lora
        routing = lora.ctx.routing if lora is not None else None
        if routing is None:
            return None
        used = set(routing.slots)
        for part in parts:
            if part.kernel is None or any(part.general(s) for s in used):
                return None
            lora = part.lora
            if lora is not None and not used.isdisjoint(lora.ranks) and not lora.concatenates(routing):
                return None
        ys = []
        for part in parts:
            assert part.kernel is not None
            if part.rounds:
                y = part.kernel(x16 if x16 is not None else x.to(torch.bfloat16)).to(x.dtype)
                ys.append(y if part.bias is None else y + part.bias)
            else:
                ys.append(part.kernel(x))
        with_lora = [
            (part.lora.concatenated(routing), i)
            for i, part in enumerate(parts)
            if part.lora is not None and not used.isdisjoint(part.lora.ranks)
        ]
        if not with_lora:
            return ys
        widths = [ys[i].shape[1] for _, i in with_lora]
        a_side, b_block = self._mixed_weights([w for w, _ in with_lora], widths)
        masks = [w[2] for w, _ in with_lora]
        kept = self.mask
        if kept is None or len(kept[0]) != len(masks) or any(a is not b for a, b in zip(kept[0], masks)):  # noqa: B905
            kept = self.mask = (masks, torch.cat([m.view(m.shape[0], -1) for m in masks], dim=1))
        deltas = torch.mm(torch.mm(x, a_side).mul_(kept[1]), b_block)
        start = 0
        for _, i in with_lora:
            width = ys[i].shape[1]
            ys[i] = ys[i] + deltas[:, start : start + width]
            start += width
        return ys

    def _mixed_weights(
        self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], widths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts' side-by-side A^T laid side by side, their B^T block-diagonal; remade when a
        part's own copies change."""
        kept = self.mixed
        if (
            kept is not None
            and len(kept[0]) == len(weights)
            and all(a is w[0] for a, w in zip(kept[0], weights, strict=True))
        ):
            return kept[1], kept[2]
        a_side = torch.cat([a_t for a_t, _, _ in weights], dim=1)
        b_block = a_side.new_zeros(a_side.shape[1], sum(widths))
        row = col = 0
        for (_, b_t, _), width in zip(weights, widths, strict=True):
            b_block[row : row + b_t.shape[0], col : col + width] = b_t
            row, col = row + b_t.shape[0], col + width
        self.mixed = ([a_t for a_t, _, _ in weights], a_side, b_block)
        return a_side, b_block

    def _lora(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``slot``'s LoRA weights for the whole group (None: no part has any), remade when the
        layers' own copies change (another adapter, or new weights in the slot)."""
        pairs = [
            (part.lora.alone(slot), bounds)
            for part, bounds in zip(self.parts, self.bounds, strict=True)
            if part.lora is not None and slot in part.lora.ranks
        ]
        if not pairs:
            return None
        kept = self.lora
        if (
            kept is not None
            and len(kept[0]) == len(pairs)
            and all(a is b for a, b in zip(kept[0], (p[0][0] for p in pairs), strict=True))
        ):
            return kept[1], kept[2]
        a_side = torch.cat([a_t for (a_t, _), _ in pairs], dim=1)
        b_block = a_side.new_zeros(a_side.shape[1], self.bounds[-1][1])
        row = 0
        for (_, b_t), (start, end) in pairs:
            b_block[row : row + b_t.shape[0], start:end] = b_t
            row += b_t.shape[0]
        self.lora = ([a_t for (a_t, _), _ in pairs], a_side, b_block)
        return a_side, b_block


def _fuse(group: _Group, modules: list[nn.Module]) -> None:
    """Lay the packed weights of ``modules``' bases end to end, when they allow it (see
    :class:`_Group`), checked on a random input against the separate matmuls."""
    bases = [m.base if isinstance(m, MultiLoraLinear) else m for m in modules]
    if not all(isinstance(b, QuantizedLinear) and b.cpu_kernel and b.kind in ("int8", "int4") for b in bases):
        return
    layers = [b for b in bases if isinstance(b, QuantizedLinear)]
    if len({(b.kind, b.in_features) for b in layers}) != 1:
        return
    packed = torch.cat([b.packed for b in layers])
    scales = torch.cat([b.scales for b in layers], dim=0 if layers[0].kind == "int8" else 1).contiguous()
    fused = QuantizedLinear(
        layers[0].in_features,
        packed.shape[0],
        layers[0].kind,
        packed,
        scales,
        None,
        layers[0].compute_dtype,
        cpu_kernel=True,
    )
    kernel = fused.bf16_kernel()
    assert kernel is not None
    probe = torch.randn(1, layers[0].in_features, dtype=torch.bfloat16, device=packed.device)
    parts = [b.bf16_kernel() for b in layers]
    separate = torch.cat([part(probe) for part in parts if part is not None], dim=1)
    if not torch.equal(kernel(probe), separate):
        return
    start = 0
    for b in layers:
        rows = b.packed.shape[0]
        b.packed = packed[start : start + rows]  # the layer's own weights: a view of the whole
        group.bounds.append((start, start + rows))
        start += rows
    group.kernel = kernel
    if any(b.bias is not None for b in layers):
        group.bias = torch.cat(
            [
                b.bias if b.bias is not None else packed.new_zeros(b.out_features, dtype=b.compute_dtype)
                for b in layers
            ]
        )


@dataclass(frozen=True)
class _Layer:
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: _Group
    o: _Group
    q_norm: nn.Module | None  # qwen3 normalizes each head of q and k
    k_norm: nn.Module | None
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_up: _Group
    down: _Group
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

    def __init__(self, model: Any) -> None:  # a transformers model of one of FAMILIES
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
                    qkv=_Group([attn.q_proj, attn.k_proj, attn.v_proj]),
                    o=_Group([attn.o_proj]),
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                    post_norm=_norm(layer.post_attention_layernorm, dtype),
                    gate_up=_Group([mlp.gate_proj, mlp.up_proj]),
                    down=_Group([mlp.down_proj]),
                    act=mlp.act_fn,
                    scaling=float(attn.scaling),
                )
            )
        if any(layer.qkv.kernel is not None or layer.gate_up.kernel is not None for layer in self.layers):
            return_freed_memory()  # the layers' weights before they were laid end to end

    @classmethod
    def of(cls, model: nn.Module) -> OneRowDecoder | None:
        """The step for ``model``, or None when its family's layers are laid out otherwise."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in FAMILIES:
            return None
        return cls(model)

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
        h = self.embed(ids).view(rows * n, -1)  # [rows x n, hidden]
        cos, sin = self.rotary(h, positions)  # [rows, n, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        gqa = heads != kv_heads
        padding = None if mask is None or bool(mask.all()) else mask.bool()[:, None, None, :]
        causal = None if n == 1 else _causal(cache, n, h.device)
        kv: Any  # the engine's cache layers (app/engine/kv_cache.py)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            q, k, v = layer.qkv(layer.input_norm(h), slot, rows)
            q, k, v = (_heads(x, rows, c, dim) for x, c in ((q, heads), (k, kv_heads), (v, kv_heads)))
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            keys, values = kv.update(_rotated(k, cos, sin), v)
            seen = causal if padding is None else padding[..., -keys.shape[2] :]
            attn = F.scaled_dot_product_attention(
                _rotated(q, cos, sin), keys, values, attn_mask=seen, scale=layer.scaling, enable_gqa=gqa
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


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as transformers' ``apply_rotary_pos_emb`` applies it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
