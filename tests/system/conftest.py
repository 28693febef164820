"""tests/system: real server processes. Those that check mechanics (replicas, SIGKILL, SIGTERM) serve
the tiny model (``pytestmark = pytest.mark.usefixtures("tiny_base_env")``) with the PEFT adapters
made on it; the overload bench keeps the default base (its load must saturate a real model)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.peft_ref import RefAdapter


@pytest.fixture(scope="module")
def tiny_base_env(tiny_path: Path) -> Iterator[None]:
    """Server processes started meanwhile serve the tiny model (ADAPTERSERVE_BASE_MODEL), for the
    module's tests only (the overload test's server, in whatever order it runs, keeps the default)."""
    before = os.environ.get("ADAPTERSERVE_BASE_MODEL")
    os.environ["ADAPTERSERVE_BASE_MODEL"] = str(tiny_path)
    yield
    if before is None:
        os.environ.pop("ADAPTERSERVE_BASE_MODEL", None)
    else:
        os.environ["ADAPTERSERVE_BASE_MODEL"] = before


@pytest.fixture(scope="session")
def ref_adapters(tiny_ref_adapters: dict[str, RefAdapter]) -> dict[str, RefAdapter]:
    """The reference adapters of the tiny model (what the mechanics tests' servers serve)."""
    return tiny_ref_adapters
