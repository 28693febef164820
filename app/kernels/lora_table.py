"""LoRA weights as the native step's kernel reads them (``lora.cpp``): float32, or 8 bits laid
out for integer dot products, and the table of where each row's weights are."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP = 32  # inputs per scale of the rows multiplied (the base kernel's groups)
BLOCK = 16  # ranks per block of A^T, outputs per tile of B^T
MAX_RANK = 256  # (lora.cpp's buffers)


@dataclass(frozen=True)
class Lora8:
    """One adapter's LoRA weights for one layer in 8 bits, symmetric, a scale per rank (each rank's
    column of A^T and row of B^T by its largest magnitude / 127: ~0.2 % of it, per weight), laid
    out as ``lora.cpp`` reads them: ``a`` uint8 [rank/16, in/4, 16, 4] (blocks of 16 ranks, 4
    inputs to a 32-bit lane), ``b`` uint8 [out/16, rank/4, 16, 4] (tiles of 16 outputs, 4 ranks
    to a lane), values q + 128; ``sab`` float32 [rank]: the two scales' product (0 where the rank
    is padded to a multiple of 16)."""

    a: torch.Tensor
    b: torch.Tensor
    sab: torch.Tensor
    scale: float
    rank: int
    out: int

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + self.sab.nbytes


# one adapter's LoRA weights for one layer, as the native kernel reads them: float32 (A^T [in,
# rank], B^T [rank, out], the scaling) or :class:`Lora8`
LoraWeights = tuple[torch.Tensor, torch.Tensor, float] | Lora8


def fits8(in_features: int, rank: int) -> bool:
    """Whether a layer's LoRA weights can be held in 8 bits (:class:`Lora8`)."""
    return in_features % GROUP == 0 and rank <= MAX_RANK


def quantize_lora(a_t: torch.Tensor, b_t: torch.Tensor, scale: float) -> Lora8:
    """LoRA weights (A^T [in, rank], B^T [rank, out]) in 8 bits (:class:`Lora8`)."""
    width, rank = a_t.shape
    out = b_t.shape[1]
    assert fits8(width, rank), (width, rank)
    ranks, outs = -(-rank // BLOCK) * BLOCK, -(-out // BLOCK) * BLOCK
    with torch.inference_mode(False):  # (the copies are made once, when the adapter loads)
        a, b = a_t.detach().float(), b_t.detach().float()
        sa = (a.abs().amax(dim=0) / 127).clamp(min=1e-30)
        sb = (b.abs().amax(dim=1) / 127).clamp(min=1e-30)
        qa = torch.full((width, ranks), 128, dtype=torch.int16)
        qa[:, :rank] = (a / sa).round().clamp(-127, 127).to(torch.int16) + 128
        qb = torch.full((ranks, outs), 128, dtype=torch.int16)
        qb[:rank, :out] = (b / sb[:, None]).round().clamp(-127, 127).to(torch.int16) + 128
        packed_a = qa.to(torch.uint8).reshape(width // 4, 4, ranks // BLOCK, BLOCK).permute(2, 0, 3, 1)
        packed_b = qb.to(torch.uint8).reshape(ranks // 4, 4, outs // BLOCK, BLOCK).permute(2, 0, 3, 1)
        sab = torch.zeros(ranks)
        sab[:rank] = sa * sb
    return Lora8(packed_a.contiguous(), packed_b.contiguous(), sab, scale, rank, out)


def dequantize_lora(weights: LoraWeights) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The float32 A^T and B^T that the weights stand for (the two scales folded into A^T), and
    the scaling."""
    if not isinstance(weights, Lora8):
        return weights
    blocks, quads = weights.a.shape[:2]
    a = weights.a.permute(1, 3, 0, 2).reshape(quads * 4, blocks * BLOCK).float() - 128
    tiles, rank_quads = weights.b.shape[:2]
    b = weights.b.permute(1, 3, 0, 2).reshape(rank_quads * 4, tiles * BLOCK).float() - 128
    r = weights.rank
    return a[:, :r] * weights.sab[:r], b[:r, : weights.out], weights.scale


@dataclass(frozen=True)
class LoraTable:
    """Where each row's LoRA weights for each part of a group are (:meth:`Q4.lora_rows`,
    :meth:`Q4.linear`): per row and part, the addresses of A and B, the rank (padded in 8 bits;
    0: none) and the address of the 8-bit weights' scales (0: float32), and 0 (int64 [rows,
    parts, 5]); the scalings (float32 [rows, parts]); each part's first output and width (int64
    [parts]); ``held``: the tensors, kept alive with it."""

    table: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    outs: torch.Tensor
    held: tuple[torch.Tensor, ...]

    @functools.cached_property
    def args(self) -> tuple[int, int, int, int, int]:
        """The kernel's arguments for it: the table's address, the parts, the scalings', the
        offsets' and the widths' addresses (made once: a step passes them for every group)."""
        parts = self.offsets.shape[0]
        ptrs = self.table.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(), self.outs.data_ptr()
        return ptrs[0], parts, ptrs[1], ptrs[2], ptrs[3]

    @classmethod
    def of(cls, rows: list[list[LoraWeights | None]], bounds: list[tuple[int, int]]) -> LoraTable:
        """From each row's weights per part (None: none) and the parts' outputs."""
        table, scales, held = [], [], []
        for row in rows:
            for weights in row:
                if weights is None:
                    table.append((0, 0, 0, 0, 0))
                    scales.append(0.0)
                elif isinstance(weights, Lora8):
                    a, b, sab = weights.a, weights.b, weights.sab
                    table.append((a.data_ptr(), b.data_ptr(), sab.shape[0], sab.data_ptr(), 0))
                    scales.append(weights.scale)
                    held += [weights.a, weights.b, weights.sab]
                else:
                    a_t, b_t, scale = weights
                    assert a_t.dtype == b_t.dtype == torch.float32
                    assert a_t.is_contiguous() and b_t.is_contiguous()
                    table.append((a_t.data_ptr(), b_t.data_ptr(), a_t.shape[1], 0, 0))
                    scales.append(scale)
                    held += [a_t, b_t]
        return cls(
            torch.tensor(table, dtype=torch.int64),
            torch.tensor(scales, dtype=torch.float32),
            torch.tensor([a for a, _ in bounds], dtype=torch.int64),
            torch.tensor([b - a for a, b in bounds], dtype=torch.int64),
            tuple(held),
        )
