"""The immutable description of one adapter version that the engine is handed (never written after)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from app.adapters.kinds import Adapter
from app.adapters.tasks import AdapterKind, Task

_uids = itertools.count(1)


def next_uid() -> int:
    """A process-unique id for a new adapter version (thread-safe: ``itertools.count`` is atomic)."""
    return next(_uids)


@dataclass(frozen=True)
class AdapterVersion:
    """One version of one adapter. ``uid`` is unique per version in this process; the engine keys its
    slots by it, and where a version is resident is only ever said by the engine's own structures."""

    name: str
    version: int
    task: Task
    kind: AdapterKind
    labels: tuple[str, ...]
    size_bytes: int  # bytes of the validated weights in memory
    uid: int = field(default_factory=next_uid)

    @classmethod
    def from_adapter(cls, name: str, adapter: Adapter, version: int = 1) -> AdapterVersion:
        return cls(
            name=name,
            version=version,
            task=adapter.task,
            kind=adapter.kind,
            labels=tuple(adapter.labels),
            size_bytes=adapter.nbytes,
        )
