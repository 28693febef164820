"""Quantized layers: the weight-only kernels compute with exactly the weights ``dequantized()``
reports, those stay close to the float weights, and the bytes shrink as documented; the w8a8
kernel computes its per-row integer grid, the same in any batch, and trains straight through."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from app import kernels
from app.models import w8a8
from app.models.quantize import quantize_model, rounds_activations, weight_bytes
from app.models.quantized_layers import INT4_GROUP, QuantizedEmbedding, QuantizedLinear


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize(("out", "width", "bias"), [(192, 576, False), (1536, 576, True), (576, 1536, False)])
def test_kernel_computes_with_the_dequantized_weights(kind: str, out: int, width: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(width, out, bias=bias)
    q = QuantizedLinear.of(layer, kind)  # type: ignore[arg-type]
    w = q.dequantized()
    x = torch.randn(7, 3, width)
    if rounds_activations(kind, torch.device("cpu")):  # the packed CPU kernels: bf16 in and out
        expected = x.to(torch.bfloat16).float() @ w.t() + (layer.bias if bias else 0)
        assert torch.allclose(q(x), expected, atol=2e-2, rtol=1e-2)
        # bf16 scales (and zeros) and dequantized() reading the kernel's bf16 outputs
        rounding = layer.weight.abs().amax(1, keepdim=True) * 2**-7 + w.abs() * 2**-8
    else:
        expected = x @ w.t() + (layer.bias if bias else 0)
        assert torch.allclose(q(x), expected, atol=1e-5, rtol=0)
        rounding = torch.zeros_like(w)
    # the rounding error is within half a step: int8 amax/127 per row, int4 (max-min)/15 per group
    step = layer.weight.abs().amax(1, keepdim=True) / 127
    if kind == "int4":
        g = layer.weight.reshape(out, width // INT4_GROUP, INT4_GROUP)
        step = ((g.amax(2) - g.amin(2)) / 15).repeat_interleave(INT4_GROUP, dim=1)
    assert bool(((w - layer.weight).abs() <= step / 2 + rounding + 1e-6).all())
    full = layer.weight.numel() * 4
    assert q.weight_bytes - (layer.bias.numel() * 4 if bias else 0) <= full * (
        0.26 if kind == "int8" else 0.16
    )


def test_int4_falls_back_to_int8_where_the_kernel_cannot_take_the_shape() -> None:
    layer = nn.Linear(100, 64)  # 100 inputs: not a multiple of the group
    assert QuantizedLinear.of(layer, "int4").kind == "int8"


def test_a_tied_head_reads_the_quantized_embedding_rows() -> None:
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(256, 64)
            self.proj = nn.Linear(64, 64)
            self.head = nn.Linear(64, 256, bias=False)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def get_output_embeddings(self) -> nn.Module:
            return self.head

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.proj(self.embed(ids)))  # type: ignore[no-any-return]

    model = Tiny()
    before = weight_bytes(model)
    after = quantize_model(model, "int4")
    assert isinstance(model.embed, QuantizedEmbedding) and isinstance(model.head, QuantizedLinear)
    assert model.head.packed.data_ptr() == model.embed.packed.data_ptr()  # one copy of the rows
    assert after < 0.3 * before
    ids = torch.tensor([[3, 7, 255]])
    rows = model.embed.dequantized()
    proj = model.proj
    assert isinstance(proj, QuantizedLinear)
    expected = (rows[ids] @ proj.dequantized().t() + proj.bias) @ rows.t()
    if proj.native is not None:  # our kernel: both matmuls' inputs rounded to 8 bits per group of 32
        hidden = kernels.round_activations(rows[ids]) @ proj.dequantized().t() + proj.bias
        expected = kernels.round_activations(hidden) @ rows.t()
        assert torch.allclose(model(ids), expected, atol=1e-4, rtol=1e-5)
    elif rounds_activations("int4", torch.device("cpu")):  # bf16 activations: a bf16 step of ~1e-2
        assert torch.allclose(model(ids), expected, atol=6e-2, rtol=2e-2)
    else:
        assert torch.allclose(model(ids), expected, atol=1e-4)


@pytest.mark.parametrize(("out", "width"), [(192, 576), (576, 1536)])
def test_w8a8_rows_are_quantized_on_their_own_grid(out: int, width: int) -> None:
    """fbgemm's integer matmul computes the 7-bit weights times each row (smoothed, outlier
    channels aside) snapped to its own 8-bit grid, plus the outlier channels in float; the same in
    any batch (the integer part bit for bit); and the layer stays close to the float one."""
    torch.manual_seed(0)
    layer = nn.Linear(width, out, bias=True)
    act_max = torch.rand(width) * 4 + 0.1
    act_max[:3] = 40  # three wide channels: outliers
    q = QuantizedLinear.of(layer, "w8a8", act_max)
    kernel = q.w8a8
    assert kernel is not None and kernel.packed is not None and q.kind == "w8a8"
    assert {0, 1, 2} <= set(kernel.outliers.tolist()) and len(kernel.outliers) == w8a8.OUTLIERS
    x = torch.randn(9, width) * act_max  # channels of different ranges
    x[3] *= 50  # a row far larger than the others
    y = q(x)
    alone = torch.cat([q(x[i : i + 1]) for i in range(len(x))])
    # a row's result does not depend on its batch (up to the float outlier matmul's sum order)
    assert torch.allclose(y, alone, atol=1e-5 * float(y.abs().max()), rtol=0)
    int8, scale = kernel.int8()
    assert int(int8.abs().max()) <= w8a8.WEIGHT_MAX
    assert bool((int8[:, kernel.outliers] == 0).all())
    smooth = x * kernel.inv_smooth
    amax = smooth.abs().amax(1, keepdim=True)
    step = torch.tensor(w8a8.STEP)
    snapped = torch.round(smooth / amax / step).clamp(-128, 127) * step * amax
    expected = snapped @ (int8.float() * scale[:, None]).t() + x[:, kernel.outliers] @ kernel.outlier_w
    expected += layer.bias
    assert torch.allclose(y, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    exact = layer(x)
    assert float((y - exact).norm() / exact.norm()) < 0.02
    assert float((q.dequantized() - layer.weight).norm() / layer.weight.norm()) < 0.03


def test_w8a8_without_fbgemm_computes_the_same_grid() -> None:
    """Where fbgemm is not there (CUDA; a CPU without it) the same grid feeds PyTorch's int8
    weight kernel: the same outputs."""
    torch.manual_seed(0)
    layer = nn.Linear(576, 192)
    act_max = torch.rand(576) * 4 + 0.1
    fast = w8a8.Kernel(layer.weight, act_max, keep_int8=True)
    plain = w8a8.Kernel(layer.weight, act_max, keep_int8=True)
    plain.packed = None
    x = torch.randn(7, 576) * act_max
    expected = fast(x)
    assert torch.allclose(plain(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_w8a8_trains_through_a_straight_through_gradient() -> None:
    """The training layer computes the served layer's outputs; its input gradient is the float
    layer's it stands for."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    act_max = torch.rand(64) + 0.5
    served = QuantizedLinear.of(layer, "w8a8", act_max)
    train = w8a8.W8A8Linear(w8a8.Kernel(layer.weight, act_max, keep_int8=True), layer.bias)
    x = torch.randn(5, 64, requires_grad=True)
    y = train(x)
    assert torch.equal(y, served(x.detach()))
    y.sum().backward()
    assert x.grad is not None
    assert torch.allclose(train.weight, served.dequantized())
    assert torch.allclose(x.grad, train.weight.sum(0).expand(5, 64), atol=1e-5)


def test_w8a8_layers_reading_one_input_share_one_kernel() -> None:
    """Calibration finds the layers fed the same tensor (q, k, v); they share one stacked matmul,
    and each part's output is its slice, whatever order and inputs the parts are asked with."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 16), nn.Linear(64, 16)
            self.o = nn.Linear(64, 64)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.one_hot(input_ids, 64).float()
            return self.o(self.q(h)) + self.k(h).sum() + self.v(h).sum()

    class Tok:
        def __call__(self, text: str, return_tensors: str) -> Any:
            ids = torch.tensor([[ord(c) % 64 for c in text[:32]]])

            class Enc(dict[str, torch.Tensor]):
                def to(self, device: torch.device) -> Enc:
                    return self

            return Enc(input_ids=ids)

    model = Block()
    names = ["q", "k", "v", "o"]
    calibration = w8a8.calibrate(model, Tok(), names)
    assert calibration[1] == [["q", "k", "v"]]
    parts = w8a8.kernels(model, names, calibration)
    kernel = parts["q"][0]
    assert parts["k"][0] is kernel and parts["v"] == (kernel, 2) and parts["o"][0] is not kernel
    x, y = torch.randn(5, 64), torch.randn(3, 64)
    full_x, full_y = kernel(x), kernel(y)
    assert torch.equal(kernel.part(0, x), full_x[:, :64])
    assert torch.equal(kernel.part(1, y), full_y[:, 64:80])  # another input: computed anew
    assert torch.equal(kernel.part(1, x), full_x[:, 64:80])
    assert torch.equal(kernel.part(2, x), full_x[:, 80:])
    assert torch.equal(kernel.part(0, x), full_x[:, :64])  # asked again: still right


@pytest.mark.parametrize(("out", "width", "bias"), [(192, 576, False), (1536, 576, True), (576, 1536, False)])
def test_bf16_computes_as_its_reference_layer_with_bf16_weights(out: int, width: int, bias: bool) -> None:
    """The bf16 format (oneDNN's packed kernel where the CPU has bf16 dot products) computes what
    :class:`BF16Linear` (PEFT's reference, and what training runs) computes, to bf16's last bit."""
    from app.models.bf16 import BF16Linear

    torch.manual_seed(0)
    layer = nn.Linear(width, out, bias=bias)
    q = QuantizedLinear.of(layer, "bf16")
    ref = BF16Linear.of(layer)
    w = q.dequantized()
    assert torch.equal(w, layer.weight.detach().bfloat16().float()) and torch.equal(w, ref.weight)
    for rows in (1, 5, 33):
        x = torch.randn(rows, 2, width)
        got, expected = q(x), ref(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 2, out)
        # outputs are rounded to bf16: 2⁻⁸ relative; a different summation order may flip the last bit
        assert torch.allclose(got, expected, rtol=2**-7, atol=1e-3)
    assert q.weight_bytes - (layer.bias.numel() * 4 if bias else 0) == layer.weight.numel() * 2


def test_bf16_embedding_and_tied_head() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(300, 64)
    q = QuantizedEmbedding(emb, "bf16")
    ids = torch.tensor([[3, 299, 0]])
    assert torch.equal(q(ids), emb(ids).detach().bfloat16().float())
    head = q.head(None)
    h = torch.randn(4, 64)
    ref = h.bfloat16().float() @ q.dequantized().t()
    assert torch.allclose(head(h), ref, rtol=2**-7, atol=1e-3)


def test_auto_is_int4_for_the_native_families_else_bf16_where_the_cpu_multiplies_bf16_else_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.models import quantize
    from app.platform import Capability

    for isa, expected in ((("avx2",), "none"), (("avx2", "avx512", "avx512_bf16"), "bf16")):
        cap = Capability(cpu="test", isa=isa, torch_cpu="AVX2", cores=2)
        monkeypatch.setattr(quantize, "capability", lambda cap=cap: cap)
        monkeypatch.setattr("app.platform._onednn_bf16", lambda: True)
        assert quantize.resolve("auto", torch.device("cpu")) == expected
        assert quantize.resolve("auto", torch.device("cuda")) == "none"  # (bf16 is the GPU's dtype)
        assert quantize.resolve("int8", torch.device("cpu")) == "int8"
        for family in ("llama", "qwen3"):  # the native step's families: int4 on its kernels
            assert quantize.resolve("auto", torch.device("cpu"), family) == "int4"
            assert quantize.resolve("auto", torch.device("cuda"), family) == "none"
        for family in ("gpt2", "bert", "gemma3_text", None):  # others as before
            assert quantize.resolve("auto", torch.device("cpu"), family) == expected
        monkeypatch.setattr(quantize.kernels, "q4", lambda: None)  # no compiler: as before
        assert quantize.resolve("auto", torch.device("cpu"), "llama") == expected
        monkeypatch.undo()
