"""The catalog on a store folder with real PEFT adapters of the tiny model and no engine: a request
resolves its name once, to fixed versions that a replace does not change; what uploads, replaces,
pins, compositions and deletes do to its state and the store's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.adapters.catalog import AdapterCatalog
from app.adapters.composition import Composition
from app.adapters.store import folder_store
from app.errors import AdapterNotFound, Conflict, TaskMismatch
from app.models.base_lm import BaseLM
from tests.helpers.peft_ref import RefAdapter, zip_folder


@pytest.fixture
def catalog(base_model: BaseLM, tmp_path: Path) -> AdapterCatalog:
    catalog = AdapterCatalog.detached(folder_store(tmp_path / "store"), base_model.spec)
    catalog.scan()
    return catalog


def _upload(catalog: AdapterCatalog, name: str, ref: RefAdapter, tmp_path: Path) -> int:
    archive = tmp_path / f"{name}-{ref.name}.zip"
    archive.write_bytes(zip_folder(ref.folder))
    return catalog.upload(name, archive).version


def test_a_request_keeps_the_versions_it_resolved_across_a_replace(
    catalog: AdapterCatalog, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    assert _upload(catalog, "talk", ref_adapters["gen-qv-r8"], tmp_path) == 1
    assert _upload(catalog, "other", ref_adapters["gen-pattern"], tmp_path) == 1
    before = asyncio.run(catalog.resolve("talk", "generate"))
    pair = Composition((("talk", 1.0), ("other", 2.0)), "average")
    ensemble = asyncio.run(catalog.resolve(None, "generate", pair))
    assert _upload(catalog, "talk", ref_adapters["gen-all-rslora"], tmp_path) == 2
    after = asyncio.run(catalog.resolve("talk", "generate"))
    old, new = before.single, after.single
    assert old is not None and new is not None
    assert (old.record.version, new.record.version) == (1, 2) and old.record.uid != new.record.uid
    assert old.weights is not new.weights and old.weights.rank == 8 and new.weights.rank == 16
    # the ensemble resolved before the replace runs on version 1 of its member, weighted as asked
    assert ensemble.ensemble and ensemble.method == "average" and ensemble.label == "talk+other"
    assert [(h.record.name, h.record.version, h.weight) for h in ensemble.members] == [
        ("talk", 1, 1.0),
        ("other", 1, 2.0),
    ]
    assert catalog.describe(catalog.get("talk"))["tier"] == "host"  # the new version's weights are held


def test_what_each_change_does_to_the_catalog_and_the_store(
    catalog: AdapterCatalog, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    _upload(catalog, "topic", ref_adapters["cls-4"], tmp_path)
    _upload(catalog, "talk", ref_adapters["gen-qv-r8"], tmp_path)
    with pytest.raises(TaskMismatch, match="use /generate"):
        asyncio.run(catalog.resolve("talk", "classify"))
    with pytest.raises(AdapterNotFound, match="did you mean 'topic'"):
        asyncio.run(catalog.resolve("topc", "classify"))
    # pins: recorded here and (fleet) in the store; a deleted name loses its pin
    asyncio.run(catalog.pin("topic", fleet=True))
    assert catalog.pinned("topic") and catalog.describe(catalog.get("topic"))["pinned"] is True
    assert catalog.store.state() and "topic" in catalog.store.pins
    asyncio.run(catalog.unpin("topic", fleet=True))
    catalog.store.state()  # a listing refreshes the store's pins
    assert not catalog.pinned("topic") and "topic" not in catalog.store.pins
    # compositions: recorded in the store, refused over an adapter's name, guarding their members
    saved = asyncio.run(catalog.compose(Composition((("talk", 1.0),), "average", name="helpdesk")))
    assert saved.version == 1 and catalog.composition("helpdesk") == saved
    with pytest.raises(Conflict, match="an adapter's name"):
        asyncio.run(catalog.compose(Composition((("talk", 1.0),), "average", name="topic")))
    with pytest.raises(Conflict, match="composition's name"):
        _upload(catalog, "helpdesk", ref_adapters["gen-qv-r8"], tmp_path)
    with pytest.raises(Conflict, match="member of the composition"):
        asyncio.run(catalog.delete("talk"))
    assert asyncio.run(catalog.resolve("helpdesk", "generate")).label == "helpdesk"
    asyncio.run(catalog.delete_composition("helpdesk"))
    asyncio.run(catalog.delete("talk"))
    assert "talk" not in catalog and catalog.compositions() == []
    # a fresh catalog on the same store reads the same state back
    fresh = AdapterCatalog.detached(catalog.store, catalog.intake.spec)
    fresh.scan()
    assert [(r.name, r.version) for r in fresh.adapters()] == [("topic", 1)]
    assert fresh.compositions() == []
