"""Copying adapter weights into the LoRA banks' slot views (:func:`write_lora`)."""

from __future__ import annotations

from concurrent.futures import Executor

import torch


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor], inference: bool) -> None:
    with torch.inference_mode(inference):  # the caller's mode (banks may be inference tensors)
        torch._foreach_copy_(dst, src)


def write_lora(
    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]],
    copier: Executor | None = None,
) -> None:
    """Copy LoRA weights into slot views: each ``(dst_a, dst_b, a, b, scale)`` gets ``dst_a = a`` and
    ``dst_b = b * scale``, converting device and dtype on the way.

    One adapter is hundreds of small tensors, so the per-tensor overhead is most of the cost: the
    copies of A are one batched call, and on CPU they run in a helper thread while this one scales
    B (a load runs between forwards, when the engine's cores are otherwise idle): ``copier``, a
    one-thread executor owned by the caller (see :class:`app.platform.ReleasingExecutor`).
    """
    dst_a = [w[0] for w in writes]
    src_a = [w[2] for w in writes]
    pending = None
    if copier is not None and len(writes) > 1 and dst_a[0].device.type == "cpu":
        pending = copier.submit(_copy_all, dst_a, src_a, torch.is_inference_mode_enabled())
    else:
        torch._foreach_copy_(dst_a, src_a)
    try:
        for _, dst_b, _, b, scale in writes:
            if b.device == dst_b.device and b.dtype == dst_b.dtype:
                torch.mul(b, scale, out=dst_b)  # copy and scale in one pass
            else:  # convert first, then scale in the bank's dtype
                dst_b.copy_(b)
                dst_b.mul_(scale)
    finally:
        if pending is not None:
            pending.result()
