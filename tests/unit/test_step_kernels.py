"""The native step's kernels (app/kernels/attention.cpp, lora.cpp and the int4 matmul's prologues)
on every instruction set the CPU offers, against PyTorch: the RMS norm and SwiGLU in front of the
matmul, the residual add behind it, the attention of one new token a row (rotary embedding,
per-head norms, the new key and value written into the cache's buffer, grouped heads, padding) and
of a prefill chunk, and each row's LoRA deltas (float32 and 8-bit weights)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

from app import kernels


@pytest.fixture(scope="module")
def isas() -> list[kernels.Q4]:
    kernel = kernels.q4()
    assert kernel is not None, "the int4 kernel did not build (make test installs g++)"
    return [kernels.Q4(kernel.lib, isa) for isa in sorted({1, kernel.isa})]


def _packed(out: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.pack(*kernels.quantize(torch.randn(out, width) * 0.05))


def _product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return kernels.round_activations(x) @ kernels.unpack(packed, scales).t()


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tolerance, err


@pytest.mark.parametrize("rows", [1, 5])
def test_norm_and_swiglu_prologues_and_the_residual_add(isas: list[kernels.Q4], rows: int) -> None:
    torch.manual_seed(rows)
    width, out = 96, 48
    packed, scales = _packed(out, width)
    bias = torch.randn(out)
    x = torch.randn(rows, width) * 3
    weight, eps = torch.rand(width) + 0.5, 1e-5
    normed = F.rms_norm(x, (width,), weight, eps)
    gate_up = torch.randn(rows, 2 * width)
    swiglu = F.silu(gate_up[:, :width]) * gate_up[:, width:]
    for k in isas:
        y, rows_out = torch.empty(rows, out), torch.empty(rows, width)
        k.linear(x, packed, scales, bias, y, norm=(weight, eps), rows_out=rows_out)
        torch.testing.assert_close(rows_out, normed, rtol=1e-5, atol=1e-5)
        _close(y, _product(rows_out, packed, scales) + bias, 2e-6)
        residual = torch.randn(rows, out)
        y = residual.clone()
        k.linear(gate_up, packed, scales, None, y, swiglu=True, rows_out=rows_out, accumulate=True)
        torch.testing.assert_close(rows_out, swiglu, rtol=1e-5, atol=1e-6)
        _close(y - residual, _product(rows_out, packed, scales), 2e-5)
        plain = torch.empty(rows, out)
        k.linear(x, packed, scales, None, plain)  # no prologue: the plain matmul
        assert torch.equal(plain, k.matmul(x, packed, scales, None))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
@pytest.mark.parametrize("head_norms", [False, True])
def test_the_attention_of_a_decode_step_equals_sdpa(
    isas: list[kernels.Q4], heads: int, kv_heads: int, dim: int, head_norms: bool
) -> None:
    torch.manual_seed(heads + dim)
    rows, cached, spare = 3, 37, 5
    capacity = rows + 2
    k_buf = torch.randn(capacity, kv_heads, cached + 1 + spare, dim)
    v_buf = torch.randn(capacity, kv_heads, cached + 1 + spare, dim)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(rows, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    mask = torch.ones(rows, cached + 1, dtype=torch.uint8)
    mask[1, :20] = 0  # a left-padded row
    q_norm = torch.rand(dim) + 0.5 if head_norms else None
    k_norm = torch.rand(dim) + 0.5 if head_norms else None
    eps = 1e-6
    q = qkv[:, : heads * dim].view(rows, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    if q_norm is not None and k_norm is not None:
        q, k = F.rms_norm(q, (dim,), q_norm, eps), F.rms_norm(k, (dim,), k_norm, eps)
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    keys = torch.cat([k_buf[:rows, :, :cached], k[:, :, None]], dim=2)
    values = torch.cat([v_buf[:rows, :, :cached], v[:, :, None]], dim=2)
    want = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=mask.bool()[:, None, None], scale=0.125, enable_gqa=True
    ).reshape(rows, heads * dim)
    for kernel in isas:
        kb, vb = k_buf.clone(), v_buf.clone()
        out = torch.empty(rows, heads * dim)
        norms = (q_norm, k_norm, eps)
        kernel.attend(qkv, (heads, kv_heads, dim), (cos, sin), norms, (kb, vb, cached), mask, 0.125, out)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kb[:rows, :, cached], k, rtol=1e-6, atol=1e-6)  # the new column
        assert torch.equal(vb[:rows, :, cached], v)
        assert torch.equal(kb[:rows, :, :cached], k_buf[:rows, :, :cached])  # the rest untouched
        assert torch.equal(kb[rows:], k_buf[rows:])
        assert torch.equal(kb[:, :, cached + 1 :], k_buf[:, :, cached + 1 :])
        unmasked = torch.empty(rows, heads * dim)
        kernel.attend(qkv, (heads, kv_heads, dim), (cos, sin), norms, (kb, vb, cached), None, 0.125, unmasked)
        full = F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(unmasked, full.reshape(rows, heads * dim), rtol=1e-5, atol=1e-5)


def test_long_columns_split_over_threads_give_the_same_attention(isas: list[kernels.Q4]) -> None:
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, cached = 2, 9, 3, 64, 1500
    k_buf, v_buf = torch.randn(rows, kv_heads, cached + 1, dim), torch.randn(rows, kv_heads, cached + 1, dim)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim) * 4  # sharp softmax
    cos, sin = torch.ones(rows, dim), torch.zeros(rows, dim)
    for kernel in isas:
        out = torch.empty(rows, heads * dim)
        norms = (None, None, 1e-6)
        cache = (k_buf, v_buf, cached)
        kernel.attend(qkv, (heads, kv_heads, dim), (cos, sin), norms, cache, None, 0.125, out)
        q = qkv[:, : heads * dim].view(rows, heads, 1, dim)
        want = F.scaled_dot_product_attention(q, k_buf, v_buf, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(out, want.reshape(rows, heads * dim), rtol=1e-5, atol=1e-5)


def _lora8_delta(x: torch.Tensor, weights: kernels.LoraWeights) -> torch.Tensor:
    """One row's delta as the kernel computes it from 8- or 4-bit weights: x rounded as the base rounds
    it (8 bits per group of 32), t = scaling · x · A^T rounded to 8 bits (one scale), t · B^T."""
    a_t, b_t, scale = kernels.dequantize_lora(weights)
    t = scale * (kernels.round_activations(x) @ a_t)
    amax = t.abs().max()
    q = (t * (127 / amax)).round().clamp(-127, 127) if amax > 0 else torch.zeros_like(t)
    return (amax / 127) * q @ b_t


def _quantized(bits: int, a_t: torch.Tensor, b_t: torch.Tensor, scale: float) -> kernels.LoraWeights:
    if bits == 8:
        return kernels.quantize_lora(a_t, b_t, scale)
    return kernels.quantize_lora4(a_t, b_t, scale) if bits == 4 else (a_t, b_t, scale)


def _lora_plan(bits: int) -> tuple[list[list[kernels.LoraWeights | None]], list[tuple[int, int]], int]:
    """Rows of several adapters of different ranks on a group of three parts (one of an output
    width not a multiple of 16), some rows without a delta in some parts, runs of rows of one
    adapter longer than the kernel's blocks of rows."""
    width, outs = 96, [64, 32, 40]
    bounds = [(0, 64), (64, 96), (96, 136)]

    def weights(rank: int, out: int, scale: float) -> kernels.LoraWeights:
        a_t, b_t = torch.randn(width, rank), torch.randn(rank, out)
        return _quantized(bits, a_t, b_t, scale)

    adapters = [[weights(r, out, s) for out in outs] for r, s in ((16, 0.5), (8, 2.0), (5, 1.0), (40, 0.25))]
    plan: list[list[kernels.LoraWeights | None]] = [
        adapters[0],
        adapters[1],
        [None, None, None],
        [adapters[1][0], None, adapters[0][2]],
        adapters[3],
        *[adapters[2]] * 11,
    ]
    return plan, bounds, width


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_each_rows_lora_deltas_read_in_place(isas: list[kernels.Q4], bits: int) -> None:
    """y[row, part] += scaling · (x[row] · A^T) · B^T for each row's adapter, as PyTorch computes
    it: from float32 weights, or from 8- or 4-bit ones as the kernel rounds (within 1e-5 of that;
    within 1.5 % of the float32 delta the weights came from in 8 bits, 15 % in 4)."""
    torch.manual_seed(1)
    plan, bounds, width = _lora_plan(bits)
    table = kernels.LoraTable.of(plan, bounds)
    x = torch.randn(len(plan), width)
    start = torch.randn(len(plan), 136)
    want = start.clone()
    for r, parts in enumerate(plan):
        for (a, b), w in zip(bounds, parts, strict=True):
            if w is not None:
                if bits < 32:
                    want[r, a:b] += _lora8_delta(x[r], w)
                else:
                    a_t, b_t, scale = kernels.dequantize_lora(w)
                    want[r, a:b] += scale * (x[r] @ a_t) @ b_t
    for kernel in isas:
        y = start.clone()
        kernel.lora_rows(x, y, table)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert all(t.dtype == (torch.uint8 if bits < 32 else torch.float32) for t in table.held[:2])
    if bits < 32:  # against the float32 weights: the quantized weights' and the rounded rows' error
        a_t, b_t = torch.randn(width, 16), torch.randn(16, 64)
        exact = (x @ a_t) @ b_t
        quantized = _quantized(bits, a_t, b_t, 1.0)
        bound = 0.015 if bits == 8 else 0.15
        for kernel in isas:
            got = torch.zeros(len(plan), 64)
            kernel.lora_rows(x, got, kernels.LoraTable.of([[quantized]] * len(plan), [(0, 64)]))
            assert ((got - exact).norm() / exact.norm()).item() < bound
        back_a, back_b, _ = kernels.dequantize_lora(quantized)
        product = back_a @ back_b  # what the weights stand for: each weight within half a step
        assert ((product - a_t @ b_t).norm() / (a_t @ b_t).norm()).item() < (0.01 if bits == 8 else 0.13)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_the_matmul_adds_the_rows_lora_deltas_in_the_same_call(isas: list[kernels.Q4], bits: int) -> None:
    """``linear(..., lora=table)``: the base's product and then each row's deltas of the rows
    multiplied (after the norm or SwiGLU; onto the residual with ``accumulate``), the same bits
    as the product followed by :meth:`Q4.lora_rows`."""
    torch.manual_seed(2)
    plan, bounds, width = _lora_plan(bits)
    rows = len(plan)
    table = kernels.LoraTable.of(plan, bounds)
    packed, scales = _packed(144, width)
    y_width = 144  # the parts' 136 outputs and a tile the adapters leave alone
    weight = torch.rand(width) + 0.5
    x = torch.randn(rows, width) * 3
    gate_up = torch.randn(rows, 2 * width)
    for k in isas:
        for kind in ("plain", "norm", "swiglu"):
            residual = torch.randn(rows, y_width)
            fused, rows_out = residual.clone(), torch.empty(rows, width)
            args: dict[str, Any] = {"norm": (weight, 1e-5)} if kind == "norm" else {}
            if kind == "swiglu":
                args = {"swiglu": True}
            source = gate_up if kind == "swiglu" else x
            k.linear(
                source, packed, scales, None, fused, rows_out=rows_out, accumulate=True, lora=table, **args
            )
            apart = residual.clone()
            k.linear(source, packed, scales, None, apart, accumulate=True, **args)
            k.lora_rows(x if kind == "plain" else rows_out, apart, table)
            assert torch.equal(fused, apart), (k.name, kind)
            assert not torch.equal(fused[:, :136], residual[:, :136])


@pytest.mark.parametrize(("tokens", "cached"), [(5, 23), (19, 40)])
def test_a_prefill_chunk_attends_causally_over_the_cache(
    isas: list[kernels.Q4], tokens: int, cached: int
) -> None:
    """Several new tokens of one sequence (``causal``): token i written at column cached + i and
    attending to the cached columns and the new ones up to itself, as SDPA with a causal mask
    (AVX-512: in blocks of 8 tokens, the last one partial)."""
    torch.manual_seed(tokens)
    heads, kv_heads, dim = 9, 3, 64
    k_buf = torch.randn(2, kv_heads, cached + tokens + 3, dim)
    v_buf = torch.randn(2, kv_heads, cached + tokens + 3, dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(tokens, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    q = _rotate(qkv[:, : heads * dim].view(tokens, heads, dim), cos[:, None], sin[:, None])
    k = _rotate(
        qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim), cos[:, None], sin[:, None]
    )
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    keys = torch.cat([k_buf[0, :, :cached], k.transpose(0, 1)], dim=1)[None]
    values = torch.cat([v_buf[0, :, :cached], v.transpose(0, 1)], dim=1)[None]
    seen = torch.ones(tokens, cached + tokens, dtype=torch.bool).tril(cached)
    want = (
        F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=seen, scale=0.125, enable_gqa=True
        )[0]
        .transpose(0, 1)
        .reshape(tokens, heads * dim)
    )
    for kernel in isas:
        kb, vb = k_buf.clone(), v_buf.clone()
        out = torch.empty(tokens, heads * dim)
        norms = (None, None, 1e-6)
        kernel.attend(
            qkv, (heads, kv_heads, dim), (cos, sin), norms, (kb, vb, cached), None, 0.125, out, True
        )
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            kb[0, :, cached : cached + tokens], k.transpose(0, 1), rtol=1e-6, atol=1e-6
        )
        assert torch.equal(kb[1], k_buf[1]) and torch.equal(
            vb[0, :, cached + tokens :], v_buf[0, :, cached + tokens :]
        )
