"""LoRA weights as the native step's kernel reads them (``lora.cpp``): float32, or 8 or 4 bits laid
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


@dataclass(frozen=True)
class Lora4:
    """One adapter's LoRA weights for one layer in 4 bits, symmetric (q in -8..7, stored q + 8),
    a bf16 scale per group: 32 inputs of a rank's column of A^T, 16 ranks of an output's column
    of B^T (each group's scale chosen for the least squared error: ~8 % of a weight, ~8 % of a
    delta against ~0.7 % in 8 bits), laid out as ``lora_int4.h`` reads them: ``a`` uint8, per
    block of 16 ranks its in/8 chunks of 64 bytes (byte 4 lane + j: the input 8 k + j of rank
    lane in the low nibble, 8 k + 4 + j in the high one) then its scales bf16 [in/32, 16]; ``b``
    uint8, per tile of 16 outputs its rank/8 chunks (byte 4 lane + j: the ranks 8 k + j and 8 k +
    4 + j of output lane) then its scales bf16 [rank/16, 16]; ranks padded to 16 (zeros)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    rank: int  # (padded)
    out: int

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


# one adapter's LoRA weights for one layer, as the native kernel reads them: float32 (A^T [in,
# rank], B^T [rank, out], the scaling), :class:`Lora8` or :class:`Lora4`
LoraWeights = tuple[torch.Tensor, torch.Tensor, float] | Lora8 | Lora4


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


def _groups4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [groups, size, lanes] -> q + 8 (uint8, same shape) and bf16 scales [groups, lanes]: per
    (group, lane) the scale of least squared error among fractions of the largest magnitude / 7
    (the scale rounded to bf16 before q is computed, so as the kernel multiplies)."""
    amax = w.abs().amax(dim=1)
    best_q = torch.zeros_like(w)
    best_s = torch.ones_like(amax)
    best_err = torch.full_like(amax, float("inf"))
    for f in torch.linspace(0.6, 1.0, 17).tolist():
        s = (amax * (f / 7)).to(torch.bfloat16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = (w / s[:, None, :]).round().clamp(-8, 7)
        err = ((q * s[:, None, :] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_q = torch.where(better[:, None, :], q, best_q)
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return (best_q + 8).to(torch.uint8), best_s.to(torch.bfloat16)


def _packed4(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q + 8 [rows, lanes] (groups of rows along dim 0) and scales [groups, lanes] -> per 16 lanes
    (a block of ranks, a tile of outputs): its rows/8 chunks of [16][4] bytes (byte (lane, j) of
    chunk k: row 8 k + j in the low nibble, 8 k + 4 + j in the high one), then its scales."""
    rows, lanes = q.shape
    v = q.reshape(rows // 8, 2, 4, lanes // BLOCK, BLOCK)
    chunks = (v[:, 0] | (v[:, 1] << 4)).permute(2, 0, 3, 1).reshape(lanes // BLOCK, -1)
    scales = s.reshape(-1, lanes // BLOCK, BLOCK).transpose(0, 1).contiguous().view(torch.uint8)
    return torch.cat([chunks, scales.reshape(lanes // BLOCK, -1)], dim=1).flatten()


def quantize_lora4(a_t: torch.Tensor, b_t: torch.Tensor, scale: float) -> Lora4:
    """LoRA weights (A^T [in, rank], B^T [rank, out]) in 4 bits (:class:`Lora4`)."""
    width, rank = a_t.shape
    out = b_t.shape[1]
    assert fits8(width, rank), (width, rank)
    ranks, outs = -(-rank // BLOCK) * BLOCK, -(-out // BLOCK) * BLOCK
    with torch.inference_mode(False):  # (the copies are made once, when the adapter loads)
        a = torch.zeros(width, ranks)
        a[:, :rank] = a_t.detach().float()
        b = torch.zeros(ranks, outs)
        b[:rank, :out] = b_t.detach().float()
        qa, sa = _groups4(a.reshape(width // GROUP, GROUP, ranks))
        qb, sb = _groups4(b.reshape(ranks // BLOCK, BLOCK, outs))
        packed_a = _packed4(qa.reshape(width, ranks), sa)
        packed_b = _packed4(qb.reshape(ranks, outs), sb)
    return Lora4(packed_a, packed_b, scale, ranks, out)


def _unpack4(data: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One block or tile of :class:`Lora4` -> its weights [rows, 16] (q, float) and its bf16
    scales as float [rows / group, 16]."""
    v = data[: rows * 8].reshape(rows // 8, BLOCK, 4).permute(0, 2, 1)  # [chunk, j, lane]
    q = torch.stack([v & 15, v >> 4], dim=1).reshape(rows, BLOCK).float() - 8
    s = data[rows * 8 :].contiguous().view(torch.bfloat16).float().reshape(-1, BLOCK)
    return q, s


def dequantize_lora(weights: LoraWeights) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The float32 A^T and B^T that the weights stand for (the two scales folded into A^T), and
    the scaling."""
    if isinstance(weights, Lora4):
        return _dequantize4(weights)
    if not isinstance(weights, Lora8):
        return weights
    blocks, quads = weights.a.shape[:2]
    a = weights.a.permute(1, 3, 0, 2).reshape(quads * 4, blocks * BLOCK).float() - 128
    tiles, rank_quads = weights.b.shape[:2]
    b = weights.b.permute(1, 3, 0, 2).reshape(rank_quads * 4, tiles * BLOCK).float() - 128
    r = weights.rank
    return a[:, :r] * weights.sab[:r], b[:r, : weights.out], weights.scale


def _dequantize4(w: Lora4) -> tuple[torch.Tensor, torch.Tensor, float]:
    width = w.a.numel() // (w.rank // BLOCK) // 9  # (a block: in * 8 bytes, then in / 32 * 16 bf16)
    blocks = w.a.reshape(w.rank // BLOCK, -1)
    cols = []
    for blk in blocks:
        q, s = _unpack4(blk, width)
        cols.append((q.reshape(width // GROUP, GROUP, BLOCK) * s[:, None, :]).reshape(width, BLOCK))
    tiles = w.b.reshape(-1, w.rank * 10)
    outs = []
    for tile in tiles:
        q, s = _unpack4(tile, w.rank)
        outs.append((q.reshape(-1, BLOCK, BLOCK) * s[:, None, :]).reshape(w.rank, BLOCK))
    return torch.cat(cols, dim=1), torch.cat(outs, dim=1)[:, : w.out], w.scale


@dataclass(frozen=True)
class LoraTable:
    """Where each row's LoRA weights for each part of a group are (:meth:`Q4.lora_rows`,
    :meth:`Q4.linear`): per row and part, the addresses of A and B, the rank (padded in 8 and 4
    bits; 0: none), the address of the 8-bit weights' scales (else 0) and the bits of a 4-bit
    format (4; else 0) (int64 [rows, parts, 5]); the scalings (float32 [rows, parts]); each
    part's first output and width (int64 [parts]); ``held``: the tensors, kept alive with it."""

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
                elif isinstance(weights, Lora4):
                    table.append((weights.a.data_ptr(), weights.b.data_ptr(), weights.rank, 0, 4))
                    scales.append(weights.scale)
                    held += [weights.a, weights.b]
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
