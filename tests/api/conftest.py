"""tests/api: HTTP into the engine on the tiny model (tests/fixtures/tiny_llama.py), in the fast tier.

The fixtures of the real base are redefined here on the tiny model under the same names, so that a
test of mechanics reads the same wherever it runs; each is its own session fixture (never shared
with the real base's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.main import create_app
from app.models.base_lm import BaseLM
from tests.conftest import app_settings, serve_live, upload_all
from tests.helpers.peft_ref import RefAdapter

BUSY_TOKENS = 800  # a generation that keeps the engine busy for a second or more on the tiny model


@pytest.fixture(scope="session")
def base_path(tiny_path: Path) -> Path:
    return tiny_path


@pytest.fixture(scope="session")
def base_model(tiny_model: BaseLM) -> BaseLM:
    return tiny_model


@pytest.fixture(scope="module")
def own_tiny(tiny_path: Path) -> BaseLM:
    """The tiny model loaded again for a module's own app: an engine takes its base's layers over,
    so an app on ``tiny_model`` would leave the session's ``client`` computing with empty banks."""
    from app.models.base_lm import load_base_model
    from tests.conftest import CACHE_DIR

    return load_base_model(str(tiny_path), CACHE_DIR, "cpu", "float32")


@pytest.fixture(scope="session")
def ref_adapters(tiny_ref_adapters: dict[str, RefAdapter]) -> dict[str, RefAdapter]:
    return tiny_ref_adapters


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-store")


@pytest.fixture(scope="session")
def client(tiny_model: BaseLM, store_dir: Path) -> Iterator[TestClient]:
    """The tiny app on ``store_dir`` (the tests of one session share it, as on the real base)."""
    # the tiny model decodes a token in ~3 ms: "busy" generations take hundreds of tokens
    with TestClient(create_app(app_settings(store_dir, max_new_tokens=BUSY_TOKENS), base=tiny_model)) as c:
        yield c


@pytest.fixture(scope="session")
def uploaded(client: TestClient, ref_adapters: dict[str, RefAdapter]) -> dict[str, RefAdapter]:
    return upload_all(client, ref_adapters)


@pytest.fixture(scope="session")
def live_url(client: TestClient) -> Iterator[str]:
    with serve_live(client.app) as url:
        yield url


@pytest.fixture(scope="session")
def tok(tiny_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def base_id(client: TestClient) -> str:
    model_id: str = client.app.state.model_id  # type: ignore[attr-defined]
    return model_id
