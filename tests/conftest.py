"""Session fixtures: the real base model (loaded once), the app on a temporary store, PEFT adapters."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.config import Settings
from app.main import create_app
from app.models.base_lm import BaseLM, load_base_model, resolve_model_path
from tests.fixtures.tiny_llama import materialize
from tests.helpers.peft_ref import RefAdapter, make_adapter
from tests.helpers.s3 import s3_server

# the tests compare with float32 references (HF PEFT): the base's format is float32 unless a test
# asks for another; ADAPTERSERVE_QUANTIZATION=auto picks by machine (tested on its own)
os.environ.setdefault("ADAPTERSERVE_QUANTIZATION", "none")

ADMIN_TOKEN = "test-admin-token"
CACHE_DIR = Settings().cache_dir
# the tiers: tests under these folders load the real base model (make test); the rest, tests/api
# (HTTP into the engine on the tiny model) included, run in seconds without it (make test-fast)
MODEL_DIRS = ("integration", "system", "fuzz")

# the reference adapters (same names on the real base and on the tiny model)
ADAPTER_SPECS: list[dict[str, Any]] = [
    dict(name="gen-qv-r8", task="generate", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(
        name="gen-all-rslora",
        task="generate",
        seed=2,
        r=16,
        lora_alpha=8,
        use_rslora=True,
        target_modules="all-linear",
    ),
    dict(
        name="gen-pattern",
        task="generate",
        seed=3,
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 4, "layers.3.mlp.down_proj": 12},
        alpha_pattern={"v_proj": 32},
    ),
    dict(
        name="cls-4",
        task="classify",
        seed=4,
        labels=["business", "sport", "tech", "politics"],
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
    ),
    dict(
        name="cls-pattern",
        task="classify",
        seed=5,
        num_labels=3,
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"k_proj": 2},
    ),
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(f"/tests/{d}/" in str(item.path) for d in MODEL_DIRS):
            item.add_marker(pytest.mark.model)
        if "/tests/system/test_affinity.py" in str(item.path):
            item.add_marker(pytest.mark.nginx)
        if "/tests/api/test_prometheus.py" in str(item.path):
            item.add_marker(pytest.mark.prometheus)
        if "/tests/api/test_reupload.py" in str(item.path):
            item.add_marker(pytest.mark.slow)


def app_settings(store: Path, **overrides: Any) -> Settings:
    """The settings of a test app on ``store``: admin routes on, CPU float32, small caps."""
    values: dict[str, Any] = dict(
        store=store,
        admin_token=ADMIN_TOKEN,
        max_device_adapters=4,
        max_upload_bytes=64 * 1024 * 1024,
        max_new_tokens=64,
        device="cpu",
        dtype="float32",
        cache_dir=CACHE_DIR,
    )
    return Settings(**{**values, **overrides})


# --- the tiny model: mechanics in milliseconds (tests/fixtures/tiny_llama.py; tests/api/conftest.py) ---
@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the checked-in tokenizer (same weights on every run)."""
    return materialize(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path) -> BaseLM:
    return load_base_model(str(tiny_path), CACHE_DIR, "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_ref_adapters(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RefAdapter]:
    """PEFT adapters on the tiny model with PeftModel's outputs (the same names as ``ref_adapters``)."""
    out = tmp_path_factory.mktemp("tiny-adapters")
    return {s["name"]: make_adapter(tiny_path, out, **s) for s in ADAPTER_SPECS}  # type: ignore[arg-type]


# --- the real default base: numerics (PEFT parity, mixed batches, quantization, training) ---------
@pytest.fixture(scope="session")
def base_path() -> Path:
    path, _ = resolve_model_path("", CACHE_DIR)
    return path


@pytest.fixture(scope="session")
def base_model(base_path: Path) -> BaseLM:
    return load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peft-adapters")


@pytest.fixture(scope="session")
def ref_adapters(base_path: Path, adapters_dir: Path) -> dict[str, RefAdapter]:
    """Real PEFT adapters with random non-zero weights and PeftModel's outputs on them."""
    return {s["name"]: make_adapter(base_path, adapters_dir, **s) for s in ADAPTER_SPECS}  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def client(base_model: BaseLM, store_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(store_dir), base=base_model)) as c:
        yield c


@pytest.fixture(scope="session")
def uploaded(client: TestClient, ref_adapters: dict[str, RefAdapter]) -> dict[str, RefAdapter]:
    """All reference adapters uploaded once through the admin endpoint."""
    return upload_all(client, ref_adapters)


def upload_all(client: TestClient, refs: dict[str, RefAdapter]) -> dict[str, RefAdapter]:
    """Upload every reference adapter under its name through the admin endpoint."""
    from tests.helpers.peft_ref import zip_folder

    for name, ref in refs.items():
        resp = upload_archive(client, name, zip_folder(ref.folder), f"{name}.zip")
        assert resp.status_code == 201, resp.text
    return refs


@contextmanager
def serve_live(app: Any) -> Iterator[str]:
    """Serve an app whose lifespan already runs (inside a TestClient) with uvicorn on loopback."""
    import threading
    import time

    import uvicorn

    from bench.server import free_port

    port = free_port()
    server = uvicorn.Server(
        # keep-alive longer than any pause between a test's requests: a pooled connection the server
        # closes just as the client reuses it is a reset, not an answer
        uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", timeout_keep_alive=300
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # not graceful: a stream some test left open would hold a graceful shutdown for its timeout
        server.should_exit = server.force_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def live_url(client: TestClient) -> Iterator[str]:
    """The same app served by uvicorn on loopback (real HTTP: disconnects, concurrency)."""
    with serve_live(client.app) as url:
        yield url


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def upload_archive(client: TestClient, name: str, data: bytes, filename: str = "a.zip") -> Any:
    """POST an adapter archive (zip or tar.gz bytes) to the admin endpoint; return the response."""
    kind = "application/gzip" if filename.endswith(".gz") else "application/zip"
    return client.post(
        "/admin/adapters",
        headers=admin_headers(),
        data={"name": name},
        files={"file": (filename, data, kind)},
    )


def expect_error(resp: Any, status: int, type_: str, contains: str = "") -> dict[str, Any]:
    """Assert an error response: status, ``error.type`` and a message containing ``contains``."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_, err
    assert contains.lower() in err["message"].lower(), err
    return err  # type: ignore[no-any-return]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256 (to assert a store is unchanged)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A real S3-API server for the session (tests/helpers/s3.py); its ``AWS_*`` environment."""
    with s3_server() as env:
        yield env


@pytest.fixture(scope="session")
def tok(base_path: Path) -> PreTrainedTokenizerBase:
    """The default base's tokenizer."""
    return AutoTokenizer.from_pretrained(base_path)


@pytest.fixture(scope="session")
def base_id(client: TestClient) -> str:
    """The default base's model id (its OpenAI ``model`` name)."""
    model_id: str = client.app.state.model_id  # type: ignore[attr-defined]
    return model_id
