"""The one definition of how a composition combines its members (the wire schemas, the catalog, the
merges and the ensembles all take these names from here)."""

from __future__ import annotations

from typing import Literal, TypeGuard, get_args

CombineMethod = Literal["mean", "vote", "logits"]  # classification ensembles: outputs combined
MergeMethod = Literal["cat", "linear", "ties"]  # LoRA weights merged into one adapter (either task)
GenerateMethod = Literal[MergeMethod, "average"]  # generation: a merge, or an ensemble
Method = Literal[CombineMethod, MergeMethod, "average"]

MERGE_METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)
COMBINE_METHODS: tuple[CombineMethod, ...] = get_args(CombineMethod)
METHODS: dict[str, tuple[str, ...]] = {  # task -> the methods that serve it
    "classify": (*COMBINE_METHODS, *MERGE_METHODS),
    "generate": ("average", *MERGE_METHODS),
    "embed": ("mean", *MERGE_METHODS),  # an ensemble's vectors: their weighted mean
}


def is_merge(method: str) -> TypeGuard[MergeMethod]:
    return method in MERGE_METHODS


def is_combine(method: str) -> TypeGuard[CombineMethod]:
    return method in COMBINE_METHODS
