"""How adapter versions enter this replica: an uploaded archive validated and installed in the store,
a store version read into an :class:`AdapterRecord`, a record's weights read from the store. Blocking
(store reads and writes); the catalog calls it from worker threads."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from app.adapters.archive import ArchiveLimits, extract_archive
from app.adapters.kinds import Adapter, load_adapter
from app.adapters.lora_format import CONFIG_FILE, WEIGHTS_FILE, file_sha256
from app.adapters.objects import MissingObject
from app.adapters.records import AdapterRecord
from app.adapters.store import AdapterStore, Manifest
from app.adapters.summary import SUMMARY_KEYS, install_validated, summarize
from app.errors import AdapterLoadFailed, Conflict, InvalidAdapter
from app.metrics import Metrics
from app.models.base_lm import BaseSpec

log = logging.getLogger(__name__)


class Intake:
    """Validation and reads of one store's versions for one base model."""

    def __init__(
        self,
        store: AdapterStore,
        spec: BaseSpec,
        max_rank: int,
        limits: ArchiveLimits,
        budget: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.store = store
        self.spec = spec
        self.max_rank = max_rank
        self.limits = limits
        self.budget = budget  # the most bytes one adapter may take (host and device budgets)

    def is_this_base(self, model: str) -> bool:
        return model.casefold() == self.spec.model_id.casefold()

    def made_for(self, manifest: Manifest) -> str | None:
        """The base model a version names: its summary's, else (placed by hand, never validated
        here) the last part of PEFT's ``base_model_name_or_path``."""
        made_for = manifest.meta.get("base_model")
        if made_for is not None:
            return str(made_for)
        try:
            config = json.loads(self.store.objects.get(f"{manifest.prefix}{CONFIG_FILE}"))
            hint = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        except (MissingObject, ValueError):
            return None
        if not isinstance(hint, str):
            return None
        return Path(hint.rstrip("/")).name or None

    def record_of(self, manifest: Manifest) -> AdapterRecord | None:
        """The record of a store version; None when it is another base model's. A version placed by
        hand is validated once, here, and its summary written beside it."""
        meta = manifest.meta
        made_for = meta.get("base_model", self.spec.model_id)
        if not self.is_this_base(str(made_for)):
            log.info("adapter %s in the store is for the base model %s", manifest.name, made_for)
            return None
        if not all(k in meta for k in (*SUMMARY_KEYS, "sha256")):
            folder = self.store.folder(manifest)
            try:
                adapter = load_adapter(folder, self.spec, self.max_rank)
            except InvalidAdapter:
                other = self.made_for(manifest)
                if other is not None and not self.is_this_base(other):
                    log.info("adapter %s in the store is for the base model %s", manifest.name, other)
                    return None
                raise
            meta = {
                **meta,
                **summarize(adapter),
                "sha256": file_sha256(folder / WEIGHTS_FILE),
                "base_model": self.spec.model_id,
                "version": manifest.version,
                "created_at": manifest.created_at or folder.stat().st_mtime,
            }
            if manifest.hand_placed:
                manifest = self.store.write_summary(manifest, meta)
        self.check_budget(int(meta["size_bytes"]))
        created_at = float(meta.get("created_at", manifest.created_at))
        return AdapterRecord.of(
            manifest.name, manifest.version, created_at, meta, str(meta["sha256"]), manifest
        )

    def check_budget(self, size: int) -> None:
        if size > self.budget:
            raise InvalidAdapter(
                f"the adapter's weights take {size} bytes, more than the adapter memory budget of "
                f"{self.budget} bytes (MAX_HOST_ADAPTER_BYTES / MAX_DEVICE_ADAPTER_BYTES)",
                param="file",
            )

    def check_same_base(self, name: str) -> None:
        """A name the store holds for another base model is not replaced from this server."""
        current = self.store.current(name)
        if current is None or current.deleted:
            return
        made_for = self.made_for(current)
        if made_for is not None and not self.is_this_base(made_for):
            raise Conflict(
                f"the store's adapter {name!r} belongs to the base model {made_for!r}; this server "
                f"runs {self.spec.model_id!r}: choose another name",
                param="name",
            )

    def install(self, name: str, archive: Path) -> tuple[AdapterRecord, Adapter]:
        """Validate an archive fully, then install it in the store as the next version of ``name``."""
        staged = self.store.staging_folder()
        try:
            extract_archive(archive, staged, self.limits)
            adapter, manifest = install_validated(
                self.store,
                name,
                staged,
                self.spec,
                self.max_rank,
                check=lambda a: self.check_budget(a.nbytes),
            )
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        record = AdapterRecord.of(
            name, manifest.version, manifest.created_at, summarize(adapter), manifest.meta["sha256"], manifest
        )
        return record, adapter

    def load(self, record: AdapterRecord) -> Adapter:
        """The weights of ``record`` from the store (validated in full when the version entered it)."""
        assert record.manifest is not None, "merged adapters are never read from the store"
        start = time.perf_counter()
        try:
            folder = self.store.folder(record.manifest)
            weights = load_adapter(folder, self.spec, self.max_rank, check_values=False)
        except (InvalidAdapter, AdapterLoadFailed) as exc:
            self.metrics.adapter_load_failures.inc()
            raise AdapterLoadFailed(
                f"adapter {record.name!r} in the store could not be loaded: {exc.message}", param="adapter"
            ) from exc
        self.metrics.adapter_loads.labels(tier="host").inc()
        self.metrics.adapter_load_seconds.labels(tier="host").observe(time.perf_counter() - start)
        return weights
