"""Parameter-space merges of LoRA adapters: one new adapter from weighted members.

The methods are PEFT's ``add_weighted_adapter`` (its merge functions do the arithmetic):

- ``cat``: the exact weighted sum of the members' deltas, ``sum_i w_i s_i B_i A_i``; the merged rank
  of a layer is the sum of its members' ranks;
- ``linear``: ``A = sum_i sign_i sqrt(|w_i s_i|) A_i`` and ``B = sum_i sqrt(|w_i s_i|) B_i`` (a rough
  approximation; the members' ranks must be equal layer by layer);
- ``ties``: TIES on A and B separately (keep the ``density`` largest values of each, elect a sign,
  average the values that agree), with the same square-root split of the weights.

A layer only some members change merges from those members. The merged adapter's scaling is 1
(folded in). Classification heads are not LoRA deltas: the merged head is the weighted mean of the
members' heads, their rows aligned by label name. Bottleneck adapters do not merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from app.adapters.kinds import Adapter
from app.adapters.lora_format import LoraAdapter, host_layout
from app.adapters.methods import MergeMethod
from app.errors import IncompatibleMembers
from app.models.heads import Head, HeadLayer

SignMethod = Literal["total", "frequency"]


def merge_lora(
    members: Sequence[tuple[str, Adapter, float]],
    method: MergeMethod,
    max_rank: int,
    density: float = 1.0,
    sign_method: SignMethod = "total",
) -> LoraAdapter:
    """One LoRA adapter from ``(name, adapter, weight)`` members (see the module docstring);
    :class:`IncompatibleMembers` (400) names what does not merge."""
    loras: list[tuple[str, LoraAdapter, float]] = []
    for name, adapter, weight in members:
        if not isinstance(adapter, LoraAdapter) or adapter.magnitudes:  # (DoRA: per-adapter scales)
            raise IncompatibleMembers(
                f"{name!r} is a {adapter.kind} adapter: only LoRA adapters merge (an ensemble "
                "combines any kinds)",
                param="adapters",
            )
        loras.append((name, adapter, weight))
    if len({a.task for _, a, _ in loras}) > 1:
        raise IncompatibleMembers("merged adapters must all be for one task", param="adapters")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module in sorted(set().union(*(a.weights for _, a, _ in loras))):
        parts = [(n, a.weights[module], w) for n, a, w in loras if module in a.weights]
        merged_a, merged_b, scale = _merge_module(module, parts, method, max_rank, density, sign_method)
        weights[module] = (*host_layout(merged_a, merged_b), scale)
    first = loras[0][1]
    head: Head = ()
    if first.task == "classify":
        head = _mean_head([(n, a, w) for n, a, w in loras])
    rank = max(a.shape[0] for a, _, _ in weights.values())
    return LoraAdapter(
        task=first.task,
        rank=rank,
        alpha=float(rank),
        target_modules=sorted({m.rpartition(".")[2] for m in weights}),
        labels=list(first.labels),
        weights=weights,
        head=head,
        num_params=sum(a.numel() + b.numel() for a, b, _ in weights.values())
        + sum(layer.numel for layer in head),
    )


def _merge_module(
    module: str,
    parts: list[tuple[str, tuple[torch.Tensor, torch.Tensor, float], float]],
    method: MergeMethod,
    max_rank: int,
    density: float,
    sign_method: SignMethod,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The merged (A, B, scaling 1) of one layer from its members' (A, B, scaling) and weights."""
    ranks = [a.shape[0] for _, (a, _, _), _ in parts]
    if method == "cat":
        if sum(ranks) > max_rank:
            raise IncompatibleMembers(
                f"a cat merge of {module} has rank {sum(ranks)} (the sum of the members'), above the "
                f"server's limit {max_rank} (MAX_LORA_RANK): merge fewer or lower-rank adapters, or "
                "use linear or ties",
                param="adapters",
            )
        a = torch.cat([a.float() * (w * s) for _, (a, _, s), w in parts], dim=0)
        b = torch.cat([b.float() for _, (_, b, _), _ in parts], dim=1)
        return a, b, 1.0
    if len(set(ranks)) > 1:
        names = ", ".join(f"{n} (rank {r})" for (n, _, _), r in zip(parts, ranks, strict=True))
        raise IncompatibleMembers(
            f"{method} merges need members of one rank per layer; {module} has {names}: use cat",
            param="adapters",
        )
    split_a, split_b = [], []
    for _, (_, _, s), w in parts:  # PEFT's split: the sign goes to A, both get sqrt(|w s|)
        root = math.sqrt(abs(w * s))
        split_a.append(root if w * s >= 0 else -root)
        split_b.append(root)
    # (imported here: the peft package takes ~140 MiB of memory, which a server that never
    # merges with these methods should not carry)
    from peft.utils.merge_utils import task_arithmetic, ties

    merged = []
    for index, split in ((0, split_a), (1, split_b)):
        tensors = [pair[index].float() for _, pair, _ in parts]  # type: ignore[union-attr]
        factors = torch.tensor(split)
        if method == "linear":
            merged.append(task_arithmetic(tensors, factors))
        else:
            merged.append(ties(tensors, factors, density, sign_method))
    return merged[0], merged[1], 1.0


def _mean_head(members: list[tuple[str, LoraAdapter, float]]) -> Head:
    """The weighted mean of the members' head layers, label rows in the first member's order."""
    total = sum(w for _, _, w in members)
    if total <= 0:
        raise IncompatibleMembers(
            "merging classifiers averages their heads: the weights must have a positive sum",
            param="adapters",
        )
    first_name, first, _ = members[0]
    orders: list[list[int] | None] = []
    for name, adapter, _ in members:
        if sorted(adapter.labels) != sorted(first.labels):
            raise IncompatibleMembers(
                f"merged classifiers must share one label set: {name!r} differs from {first_name!r}",
                param="adapters",
            )
        orders.append([adapter.labels.index(lab) for lab in first.labels])
    layers: list[HeadLayer] = []
    for i, layer in enumerate(first.head):
        last = i == len(first.head) - 1
        mine = [
            (a.head[i], w, order if last else None) for (_, a, w), order in zip(members, orders, strict=True)
        ]
        if any(
            (lay.weight is None) != (layer.weight is None) or (lay.bias is None) != (layer.bias is None)
            for lay, _, _ in mine
        ):
            raise IncompatibleMembers(
                f"the members' heads differ at {layer.module} (one carries its own weights, another "
                "runs the base's): they do not merge",
                param="adapters",
            )
        if layer.weight is None:
            layers.append(layer)
            continue
        weight = _mean([(lay.weight, w, order) for lay, w, order in mine], total)
        bias = None if layer.bias is None else _mean([(lay.bias, w, order) for lay, w, order in mine], total)
        layers.append(HeadLayer(layer.module, weight, bias, layer.activation))
    return tuple(layers)


def _mean(parts: list[tuple[torch.Tensor | None, float, list[int] | None]], total: float) -> torch.Tensor:
    """Sum of ``w * t`` (rows reordered by ``order`` when given) over ``total``."""
    acc: torch.Tensor | None = None
    for t, w, order in parts:
        assert t is not None
        term = (t.float() if order is None else t.float()[order]) * w
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc / total
