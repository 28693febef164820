"""What the catalog asks of the engine: its control surface, given to the catalog's constructor."""

from __future__ import annotations

from typing import Protocol

from app.adapters.kinds import Adapter
from app.adapters.version import AdapterVersion


class EngineControl(Protocol):
    """What the catalog asks of the engine (:class:`app.engine.engine.Engine`)."""

    async def load(self, version: AdapterVersion, weights: Adapter) -> None: ...

    async def pin(self, version: AdapterVersion, weights: Adapter) -> None: ...

    async def unpin(self, name: str) -> None: ...

    def retire(self, version: AdapterVersion) -> None: ...

    def device_uids(self) -> frozenset[int]: ...


class DetachedEngine:
    """No engine: a catalog that only reads a store (tools, benchmarks, tests of the store)."""

    async def load(self, version: AdapterVersion, weights: Adapter) -> None:
        pass

    async def pin(self, version: AdapterVersion, weights: Adapter) -> None:
        pass

    async def unpin(self, name: str) -> None:
        pass

    def retire(self, version: AdapterVersion) -> None:
        pass

    def device_uids(self) -> frozenset[int]:
        return frozenset()
