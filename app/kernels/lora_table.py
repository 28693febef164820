"""LoRA weights as the native step's kernel reads them (``lora.cpp``'s ``lora_rows``): float32, or
8 bits with a scale per rank, and the table of where each row's weights are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# one adapter's LoRA weights for one layer, as the native kernel reads them: A^T [in, rank], B^T
# [rank, out] and the scaling; float32, or int8 with the scales of A^T's columns and B^T's rows
# (:func:`quantize_lora`)
LoraWeights = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]


def quantize_lora(a_t: torch.Tensor, b_t: torch.Tensor, scale: float) -> LoraWeights:
    """LoRA weights (A^T [in, rank], B^T [rank, out]) in 8 bits, symmetric: each rank's column of
    A^T and row of B^T scaled by its largest magnitude / 127 (the delta's error: ~0.2 % of each
    rank's largest weight, per weight)."""
    with torch.inference_mode(False):  # (the copies are made once, when the adapter loads)
        sa = (a_t.detach().abs().amax(dim=0).float() / 127).clamp(min=1e-30)
        sb = (b_t.detach().abs().amax(dim=1).float() / 127).clamp(min=1e-30)
        qa = (a_t.detach().float() / sa).round().clamp(-127, 127).to(torch.int8).contiguous()
        qb = (b_t.detach().float() / sb[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    return qa, qb, scale, sa.contiguous(), sb.contiguous()


def dequantize_lora(weights: LoraWeights) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The float32 A^T and B^T that :func:`quantize_lora`'s weights stand for (and the scaling)."""
    a, b, scale, sa, sb = weights
    if sa is None or sb is None:
        return a, b, scale
    return a.float() * sa, b.float() * sb[:, None], scale


@dataclass(frozen=True)
class LoraTable:
    """Where each row's LoRA weights for each part of a group are (:meth:`Q4.lora_rows`): per row
    and part, the addresses of A^T and B^T, the rank (0: none), and the addresses of the int8
    weights' scales (0: float32) (int64 [rows, parts, 5]); the scalings (float32 [rows, parts]);
    each part's first output and width (int64 [parts]); ``held``: the tensors, kept alive with it."""

    table: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    outs: torch.Tensor
    held: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, rows: list[list[LoraWeights | None]], bounds: list[tuple[int, int]]) -> LoraTable:
        """From each row's weights per part (None: none) and the parts' outputs."""
        table, scales, held = [], [], []
        for row in rows:
            for weights in row:
                if weights is None:
                    table.append((0, 0, 0, 0, 0))
                    scales.append(0.0)
                    continue
                a_t, b_t, scale, sa, sb = weights
                dtype = torch.float32 if sa is None else torch.int8
                assert a_t.dtype == b_t.dtype == dtype and a_t.is_contiguous() and b_t.is_contiguous()
                extra = (0, 0) if sa is None or sb is None else (sa.data_ptr(), sb.data_ptr())
                table.append((a_t.data_ptr(), b_t.data_ptr(), a_t.shape[1], *extra))
                scales.append(scale)
                held += [t for t in (a_t, b_t, sa, sb) if t is not None]
        return cls(
            torch.tensor(table, dtype=torch.int64),
            torch.tensor(scales, dtype=torch.float32),
            torch.tensor([a for a, _ in bounds], dtype=torch.int64),
            torch.tensor([b - a for a, b in bounds], dtype=torch.int64),
            tuple(held),
        )
