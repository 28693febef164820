"""The one definition of how a composition combines its members (the wire schemas, the catalog, the
merges and the ensembles all take these names from here)."""

from __future__ import annotations

from typing import Literal, get_args

CombineMethod = Literal["mean", "vote", "logits"]  # classification ensembles: outputs combined
MergeMethod = Literal["cat", "linear", "ties"]  # LoRA weights merged into one adapter (either task)
GenerateMethod = Literal[MergeMethod, "average"]  # generation: a merge, or an ensemble
Method = Literal[CombineMethod, MergeMethod, "average"]

MERGE_METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)
METHODS: dict[str, tuple[str, ...]] = {  # task -> the methods that serve it
    "classify": (*get_args(CombineMethod), *MERGE_METHODS),
    "generate": ("average", *MERGE_METHODS),
}
