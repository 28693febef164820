"""Adapters held on the device on purpose: loaded at start (PRELOAD), pinned through the admin route
or the configuration (PIN), and pins recorded in the store followed by every replica."""

from __future__ import annotations

import asyncio
import logging

from app.adapters.registry import AdapterInfo, AdapterRegistry
from app.engine.engine import Engine
from app.errors import AdapterLoadFailed, AdapterServeError, PinFailed

log = logging.getLogger(__name__)


async def load_on_device(registry: AdapterRegistry, engine: Engine, name: str) -> AdapterInfo:
    """Bring the current version of ``name`` into host memory and a device slot now."""
    info, weights = await asyncio.to_thread(registry.load, name)
    await engine.load(info.handle, weights)
    return info


async def pin(
    registry: AdapterRegistry, engine: Engine, name: str, limit: int, fleet: bool = False
) -> AdapterInfo:
    """Pin ``name``: load it into a device slot now and keep it in host and device memory.

    The pin is recorded only once the adapter is loaded: when the store's files cannot be read
    (:class:`PinFailed`, 409) or no slot can be freed (:class:`DeviceBusy`, 503), nothing changes.
    ``fleet``: also record it in the store, so that every replica pins it (the admin route).
    """
    await registry.lookup(name)
    registry.check_pin(name, limit)
    if fleet:  # first in the store: a sync in between then pins rather than unpins
        await asyncio.to_thread(registry.store.set_pin, name, True)
    try:
        try:
            info, weights = await asyncio.to_thread(registry.load, name)
        except AdapterLoadFailed as exc:
            raise PinFailed(f"cannot pin: {exc.message}; upload the adapter again", param="name") from exc
        await engine.pin(info.handle, weights)
    except BaseException:
        if fleet:
            await asyncio.to_thread(registry.store.set_pin, name, False)
        raise
    return registry.set_pinned(name, True)


async def unpin(registry: AdapterRegistry, engine: Engine, name: str, fleet: bool = False) -> AdapterInfo:
    """Unpin ``name``: it stays resident until least recently used (``fleet``: on every replica)."""
    await registry.lookup(name)
    registry.get(name)
    if fleet:
        await asyncio.to_thread(registry.store.set_pin, name, False)
    info = registry.set_pinned(name, False)
    await engine.unpin(name)
    return info


async def follow_fleet_pins(registry: AdapterRegistry, engine: Engine, keep: set[str], limit: int) -> None:
    """After a sync: pin here what the store records as pinned, unpin what it no longer does (the
    names in ``keep``, pinned by this replica's configuration, stay). A pin that cannot be taken now
    (no free slot) is retried at the next sync."""
    wanted = {n for n in registry.store.pins if n in registry}
    for name in sorted(wanted - registry.pinned):
        try:
            await pin(registry, engine, name, limit)
            log.info("adapter %s pinned (pinned through another replica)", name)
        except AdapterServeError as exc:
            log.info("adapter %s is pinned in the store but cannot be pinned here yet: %s", name, exc.message)
    for name in sorted(registry.pinned - wanted - keep):
        if name in registry:
            await unpin(registry, engine, name)
            log.info("adapter %s unpinned (unpinned through another replica)", name)
