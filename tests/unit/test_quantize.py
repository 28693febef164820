"""Weight-only quantized layers: the kernels compute with exactly the weights ``dequantized()``
reports, those stay close to the float weights, and the bytes shrink as documented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.models.quantize import INT4_GROUP, QuantizedEmbedding, QuantizedLinear, quantize_model, weight_bytes


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize(("out", "width", "bias"), [(192, 576, False), (1536, 576, True), (576, 1536, False)])
def test_kernel_computes_with_the_dequantized_weights(kind: str, out: int, width: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(width, out, bias=bias)
    q = QuantizedLinear.of(layer, kind)  # type: ignore[arg-type]
    w = q.dequantized()
    x = torch.randn(7, 3, width)
    expected = x @ w.t() + (layer.bias if bias else 0)
    assert torch.allclose(q(x), expected, atol=1e-5, rtol=0)
    # the rounding error is within half a step: int8 amax/127 per row, int4 (max-min)/15 per group
    step = layer.weight.abs().amax(1, keepdim=True) / 127
    if kind == "int4":
        g = layer.weight.reshape(out, width // INT4_GROUP, INT4_GROUP)
        step = ((g.amax(2) - g.amin(2)) / 15).repeat_interleave(INT4_GROUP, dim=1)
    assert bool(((w - layer.weight).abs() <= step / 2 + 1e-6).all())
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
    assert torch.allclose(model(ids), expected, atol=1e-4)
