"""The native step's attention on bf16 dot products (app/kernels/attention_bf16.h), where the CPU
has avx512_bf16: equal to float32 arithmetic on the bf16-rounded queries, keys, exponentials and
values (a decode step with padding, prefill chunks of several head layouts), and a token's
attention has the same bits in a decode step as in a prefill chunk (so a prefix computed one way
and reused serves exactly what prefilling it again would). Elsewhere the float32 kernel answers."""

from __future__ import annotations

import pytest
import torch

from app import kernels


@pytest.fixture(scope="module")
def kernel() -> kernels.Q4:
    loaded = kernels.q4()
    assert loaded is not None, "the int4 kernel did not build (make test installs g++)"
    return loaded


def _bf(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _case(heads: int, kv_heads: int, dim: int, tokens: int, cached: int, causal: bool) -> tuple:
    torch.manual_seed(heads * 7 + tokens)
    rows = 1 if causal else tokens
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim) * 2
    angles = torch.rand(tokens, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    k_buf = torch.randn(rows + 1, kv_heads, cached + tokens + 3, dim)
    v_buf = torch.randn_like(k_buf)
    mask = None
    if not causal:
        mask = torch.ones(tokens, cached + 1, dtype=torch.uint8)
        mask[-1, : min(300, cached // 2)] = 0  # a left-padded row
    return qkv, (cos, sin), k_buf, v_buf, mask


def _rounded_reference(qkv, rotary, k_buf, v_buf, mask, heads, kv_heads, dim, cached, causal):  # type: ignore[no-untyped-def]
    """Float64 arithmetic on the bf16-rounded operands, as the kernel computes: scores of rounded q
    and k, exponentials of the float32 scores less their largest, rounded, times rounded values, over
    the float32 sum of the exponentials."""
    tokens, scale = qkv.shape[0], dim**-0.5
    cos, sin = rotary
    q = _rotate(qkv[:, : heads * dim].view(tokens, heads, dim), cos[:, None], sin[:, None]) * scale
    out = torch.empty(tokens, heads, dim)
    for m in range(tokens):
        row, seen = (0, cached + 1 + m) if causal else (m, cached + 1)
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = (_bf(q[m, h]) @ _bf(k_buf[row, g, :seen]).T).float()
            if mask is not None:
                s = s.masked_fill(mask[m, -seen:] == 0, float("-inf"))
            e = torch.exp(s - s.max())
            out[m, h] = ((_bf(e) @ _bf(v_buf[row, g, :seen])) / e.double().sum()).float()
    return out.view(tokens, heads * dim)


CASES = [(9, 3, 64, 20, 300, True), (9, 3, 64, 1, 37, True), (9, 3, 64, 4, 37, False)]
CASES += [(8, 2, 128, 5, 50, True), (4, 4, 32, 7, 3, True), (8, 2, 128, 3, 70, False)]
CASES += [(9, 3, 64, 2, 1100, False), (9, 3, 64, 9, 600, True)]  # long caches


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "tokens", "cached", "causal"), CASES)
def test_bf16_attention_is_float_arithmetic_on_rounded_operands(
    kernel: kernels.Q4, heads: int, kv_heads: int, dim: int, tokens: int, cached: int, causal: bool
) -> None:
    qkv, rotary, k_buf, v_buf, mask = _case(heads, kv_heads, dim, tokens, cached, causal)
    outs = {}
    for bf16 in (True, False):
        kb, vb = k_buf.clone(), v_buf.clone()
        out = torch.empty(tokens, heads * dim)
        cache = (kb, vb, cached)
        k = kernels.Q4(kernel.lib, kernel.isa, bf16=bf16)
        k.attend(qkv, (heads, kv_heads, dim), rotary, (None, None, 1e-6), cache, mask, dim**-0.5, out, causal)
        outs[bf16] = out
    if not kernel.bf16:  # no avx512_bf16: the float32 kernel answers whatever is asked
        assert torch.equal(outs[True], outs[False])
        return
    want = _rounded_reference(qkv, rotary, kb, vb, mask, heads, kv_heads, dim, cached, causal)
    torch.testing.assert_close(outs[True], want, rtol=1e-4, atol=1e-4)
    # and it is attention: near float32's (bf16's 8 bits, sharp random scores)
    assert (outs[True] - outs[False]).abs().max().item() < 0.1


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("tokens", [11, 5, 2])  # (a short chunk goes in smaller blocks)
def test_a_token_attends_alike_in_a_decode_step_and_in_a_prefill_chunk(
    kernel: kernels.Q4, bf16: bool, tokens: int
) -> None:
    heads, kv_heads, dim, cached = 9, 3, 64, 300
    qkv, (cos, sin), k_buf, v_buf, _ = _case(heads, kv_heads, dim, tokens, cached, True)
    k = kernels.Q4(kernel.lib, kernel.isa, bf16=bf16)
    shape, norms = (heads, kv_heads, dim), (None, None, 1e-6)
    chunk_k, chunk_v, chunk = k_buf.clone(), v_buf.clone(), torch.empty(tokens, heads * dim)
    k.attend(qkv, shape, (cos, sin), norms, (chunk_k, chunk_v, cached), None, 0.125, chunk, True)
    step_k, step_v, steps = k_buf.clone(), v_buf.clone(), []
    for i in range(tokens):
        out = torch.empty(1, heads * dim)
        rotary = (cos[i : i + 1].contiguous(), sin[i : i + 1].contiguous())
        k.attend(
            qkv[i : i + 1].contiguous(), shape, rotary, norms, (step_k, step_v, cached + i), None, 0.125, out
        )
        steps.append(out)
    assert torch.equal(chunk_k, step_k) and torch.equal(chunk_v, step_v)
    if bf16 and kernel.bf16:  # one function both ways: the same bits
        assert torch.equal(chunk, torch.cat(steps))
    else:  # float32: two functions, the same to rounding
        torch.testing.assert_close(chunk, torch.cat(steps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_keys_and_values_kept_in_bf16_attend_as_float32_ones_rounded(
    kernel: kernels.Q4, causal: bool
) -> None:
    """A cache kept in bf16 (half the bytes): the new keys and values written rounded, and the
    attention bit for bit what the same cache in float32 gives (which the kernel rounds as it
    reads); without the bf16 attention such a cache is refused, not misread."""
    heads, kv_heads, dim, tokens, cached = 9, 3, 64, 6, 70
    qkv, rotary, k_buf, v_buf, mask = _case(heads, kv_heads, dim, tokens, cached, causal)
    k_buf, v_buf = k_buf.bfloat16().float(), v_buf.bfloat16().float()  # what a bf16 cache holds
    shape, norms = (heads, kv_heads, dim), (None, None, 1e-6)
    wide = (k_buf.clone(), v_buf.clone(), cached)
    narrow = (k_buf.bfloat16(), v_buf.bfloat16(), cached)
    if not kernel.bf16:
        with pytest.raises(ValueError, match="bf16 attention"):
            kernel.attend(
                qkv, shape, rotary, norms, narrow, mask, 0.125, torch.empty(tokens, heads * dim), causal
            )
        return
    outs = []
    for cache in (wide, narrow):
        out = torch.empty(tokens, heads * dim)
        kernel.attend(qkv, shape, rotary, norms, cache, mask, 0.125, out, causal)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(wide[0].bfloat16(), narrow[0]) and torch.equal(wide[1].bfloat16(), narrow[1])
    f32 = kernels.Q4(kernel.lib, kernel.isa, bf16=False)
    with pytest.raises(ValueError, match="bf16 attention"):
        f32.attend(qkv, shape, rotary, norms, narrow, mask, 0.125, torch.empty(tokens, heads * dim), causal)
