"""The int4 CPU kernel (app/kernels): it compiles on this machine, computes exactly what its float
reference computes (activations rounded to 8 bits per group of 32, times the 4-bit weights, or the
8-bit ones of the tied embeddings and head) on every instruction set the CPU offers, in any number
of rows; weights stay within half a step of the float ones; layers laid end to end are one layer;
the embeddings read from the head's layout; without it, int4 keeps PyTorch's kernels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from app import kernels
from app.models.quantize import rounds_activations
from app.models.quantized_layers import Q8Linear, QuantizedEmbedding, QuantizedLinear


@pytest.fixture(scope="module")
def q4() -> kernels.Q4:
    kernel = kernels.q4()
    assert kernel is not None, "the int4 kernel did not build (make test installs g++)"
    return kernel


def _isas(q4: kernels.Q4) -> list[kernels.Q4]:
    """The kernel on each instruction set this CPU runs (AVX2 always; AVX-512 VNNI where present)."""
    return [kernels.Q4(q4.lib, isa) for isa in sorted({1, q4.isa})]


def _reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return kernels.round_activations(x) @ kernels.unpack(packed, scales).t()


@pytest.mark.parametrize(("out", "width"), [(16, 32), (192, 576), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("rows", [1, 3, 9, 17])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_kernel_equals_its_reference(q4: kernels.Q4, out: int, width: int, rows: int, bits: int) -> None:
    torch.manual_seed(rows)
    w = torch.randn(out, width) * 0.05
    if bits == 4:
        packed, scales = kernels.pack(*kernels.quantize(w))
    else:
        packed, scales = kernels.pack8(*kernels.quantize8(w))
    assert kernels.bits(packed, scales) == bits
    x = torch.randn(rows, width) * torch.rand(width) * 4  # channels of different sizes
    x[0, :32] = 0  # a group of zeros (no scale)
    bias = torch.randn(out)
    expected = _reference(x, packed, scales) + bias
    for kernel in _isas(q4):
        y = kernel.matmul(x, packed, scales, bias)
        assert y.shape == (rows, out) and y.dtype == torch.float32
        err = (y - expected).abs().max() / expected.abs().max()
        assert err < 2e-6, (kernel.name, float(err))
        # a row's result does not depend on the rows beside it
        assert torch.equal(kernel.matmul(x[-1:], packed, scales, bias)[0], y[-1])


def test_weights_are_within_half_a_step_and_unpack_inverts_pack() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[3, :32] = 0.25  # a constant group: no step at all
    q, d, m = kernels.quantize(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    values = q.float().view(64, 4, 32) * d.float()[..., None] + m.float()[..., None]
    assert torch.equal(kernels.unpack(*kernels.pack(q, d, m)), values.view(64, 128))
    g = w.view(64, 4, 32)
    step = ((g.amax(2) - g.amin(2)) / 15)[..., None]
    # half a step, and the fp16 rounding of the scale and the least value
    bound = step / 2 + (g.abs().amax(2, keepdim=True) + 15 * step) * 2**-11
    assert bool(((values - g).abs() <= bound).all())
    assert torch.equal(values[3, 0], torch.full((32,), 0.25))


def test_8_bit_weights_are_within_half_a_step_and_rows_read_the_same_values() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    u, d, m = kernels.quantize8(w)
    assert int(u.min()) >= 1 and torch.equal(m, d * -128)
    packed, scales = kernels.pack8(u, d, m)
    values = kernels.unpack(packed, scales)
    step = (w.view(48, 2, 32).abs().amax(2, keepdim=True) / 127).expand(48, 2, 32).reshape(48, 64)
    assert bool(((values - w).abs() <= step / 2 + w.abs().amax() * 2**-11).all())
    ids = torch.tensor([[0, 17, 47], [5, 5, 31]])
    assert torch.equal(kernels.rows8(packed, scales, ids), values[ids])


def test_activations_round_to_8_bits_per_group_with_a_straight_through_gradient() -> None:
    x = torch.tensor([[1.0, -0.5, 0.3, 127.0] * 8 + [0.0] * 32], requires_grad=True)
    r = kernels.round_activations(x)
    assert torch.equal(r[0, :32], torch.tensor([1.0, -0.0, 0.0, 127.0] * 8))  # steps of 127/127 = 1
    assert torch.equal(r[0, 32:], torch.zeros(32))
    r.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_int4_layers_compute_with_the_kernel_and_their_reference_agrees(q4: kernels.Q4) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(576, 192)
    q = QuantizedLinear.of(layer, "int4")
    assert q.native is not None and rounds_activations("int4", torch.device("cpu"))
    reference = q.reference(layer)
    assert isinstance(reference, Q8Linear)
    x = torch.randn(2, 5, 576)
    assert torch.allclose(q(x), reference(x), atol=1e-5, rtol=1e-5)
    # the bytes: 4 bits a weight and two fp16 values per group of 32 (llama.cpp's Q4_1: 5 bits)
    assert q.weight_bytes == 576 * 192 * 5 // 8 + 192 * 4


def test_a_bf16_model_computes_through_the_kernel_in_float32(q4: kernels.Q4) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    q = QuantizedLinear.of(layer, "int4")
    assert q.native is not None and q.float_kernel() is None  # (the lean step: the module's path)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = kernels.round_activations(x.float()) @ q.dequantized().float().t() + layer.bias.float()
    y = q(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), expected, atol=2e-2, rtol=1e-2)


def test_a_group_of_layers_is_one_matmul_with_the_same_results(q4: kernels.Q4) -> None:
    from app.models.projection_groups import Group

    torch.manual_seed(0)
    layers = [QuantizedLinear.of(nn.Linear(576, n), "int4") for n in (576, 192, 192)]
    x = torch.randn(3, 576)
    separate = [layer(x) for layer in layers]
    group = Group(list(layers))
    assert group.kernel is not None and group.bounds == [(0, 576), (576, 768), (768, 960)]
    together = group(x, 0, 3)
    for a, b, layer in zip(together, separate, layers, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(layer(x), b)  # each layer now reads its part of the shared weights


def test_a_tied_head_and_its_embeddings_share_the_8_bit_layout(q4: kernels.Q4) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(256, 64)
    rows = QuantizedEmbedding(embedding, "int4")
    head = rows.head(None)
    assert rows.native is not None and head.native is not None and head.packed is rows.packed
    ids = torch.tensor([[3, 200, 255]])
    table = rows.dequantized()
    assert torch.equal(rows(ids), table[ids])
    assert torch.equal(head.dequantized(), table)
    assert (table - embedding.weight).abs().max() <= embedding.weight.abs().max() / 127  # per group
    x = torch.randn(2, 64)
    assert torch.allclose(head(x), kernels.round_activations(x) @ table.t(), atol=1e-5, rtol=1e-5)


@pytest.fixture
def without_kernel() -> Iterator[None]:
    kernels.configure(Path.home() / ".cache" / "adapterserve", enabled=False)
    try:
        yield
    finally:
        kernels.configure(Path.home() / ".cache" / "adapterserve", enabled=True)


def test_without_the_kernel_int4_keeps_pytorchs_kernels(without_kernel: None) -> None:
    assert kernels.q4() is None
    q = QuantizedLinear.of(nn.Linear(576, 192), "int4")
    assert q.native is None and q.kind == "int4"
    x = torch.randn(4, 576)
    assert torch.allclose(q(x), x @ q.dequantized().t() + q.bias, atol=5e-2, rtol=2e-2)


def test_a_missing_compiler_is_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kernels.q4.cache_clear()
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    try:
        assert kernels.q4() is None
        assert "no C++ compiler" in caplog.text
    finally:
        kernels.q4.cache_clear()
