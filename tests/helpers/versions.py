"""Adapter versions with their weights at hand, as the engine's callers hold them."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.adapters.kinds import Adapter
from app.adapters.version import AdapterVersion
from app.engine.types import Generation, Member, SamplingParams


@dataclass(frozen=True)
class HeldVersion(AdapterVersion):
    """An :class:`AdapterVersion` plus the weights a request would carry to the engine."""

    weights: Adapter = field(default=None, compare=False, repr=False)  # type: ignore[assignment]


def held(name: str, adapter: Adapter) -> HeldVersion:
    v = AdapterVersion.from_adapter(name, adapter)
    return HeldVersion(v.name, v.version, v.task, v.kind, v.labels, v.size_bytes, weights=adapter)


def generation(
    prompt: list[int],
    params: SamplingParams,
    version: HeldVersion | None = None,
    members: tuple[Member, ...] = (),
) -> Generation:
    """The engine's record of a generation with ``version`` (None: the bare base) or ``members``."""
    adapter = Member(version, version.weights) if version is not None else None
    return Generation(prompt, params, adapter=adapter, members=members)
