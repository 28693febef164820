"""What the store records of a validated adapter, and the one way adapters enter it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.adapters.kinds import Adapter, load_adapter
from app.adapters.lora_format import WEIGHTS_FILE, file_sha256
from app.adapters.store import AdapterStore, Manifest
from app.models.base_lm import BaseSpec

SUMMARY_KEYS = ("task", "kind", "rank", "alpha", "target_modules", "labels", "num_params", "size_bytes")


def summarize(adapter: Adapter) -> dict[str, Any]:
    return {
        "task": adapter.task,
        "kind": adapter.kind,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "target_modules": adapter.target_modules,
        "labels": adapter.labels,
        "num_params": adapter.num_params,
        "size_bytes": adapter.nbytes,
    }


def install_validated(
    store: AdapterStore,
    name: str,
    staged: Path,
    spec: BaseSpec,
    max_rank: int,
    check: Callable[[Adapter], None] | None = None,
) -> tuple[Adapter, Manifest]:
    """Validate a staged adapter folder completely, then install it as the next version of ``name``
    (the folder becomes the version); return the adapter and the version's manifest."""
    adapter = load_adapter(staged, spec, max_rank)
    if check is not None:
        check(adapter)
    summary = {
        **summarize(adapter),
        "sha256": file_sha256(staged / WEIGHTS_FILE),
        "base_model": spec.model_id,
    }
    return adapter, store.install(name, staged, summary)
