"""Pinning while every device slot is busy, and pinning an adapter whose stored files are damaged:
a documented status (503 with Retry-After, 409), the pin state unchanged, running requests as alone."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.adapters.lora_format import WEIGHTS_FILE
from app.adapters.store import folder_store
from app.adapters.summary import install_validated
from app.config import Settings
from app.main import create_app
from app.models.base_lm import load_base_model
from tests.api.conftest import BUSY_TOKENS
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, admin_headers
from tests.helpers.peft_ref import GENERATE_PROMPTS, RefAdapter

BUSY = ("gen-qv-r8", "gen-pattern")  # the two slots' adapters, generating
OTHER = "gen-all-rslora"


@pytest.fixture(scope="module")
def two_slots(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    store_dir = tmp_path_factory.mktemp("pin-store")
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    store = folder_store(store_dir)
    for name in (*BUSY, OTHER, "damaged"):
        staged = store.staging_folder()
        source = ref_adapters[OTHER if name == "damaged" else name].folder
        for f in source.iterdir():
            shutil.copyfile(f, staged / f.name)
        install_validated(store, name, staged, base.spec, 64)
    damaged = store.current("damaged")
    assert damaged is not None
    weights = store.folder(damaged) / WEIGHTS_FILE  # listed from its manifest, unreadable when loaded
    weights.write_bytes(weights.read_bytes()[:1000])
    settings = Settings(
        store=store_dir,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        max_device_adapters=2,
        max_new_tokens=BUSY_TOKENS,
        device="cpu",
        dtype="float32",
    )
    with TestClient(create_app(settings, base=base)) as c:
        yield c


def _adapter(client: TestClient, name: str) -> dict[str, object]:
    body: dict[str, object] = client.get(f"/v1/adapters/{name}").json()
    return body


def test_pin_while_every_slot_is_busy_is_503_and_changes_nothing(
    two_slots: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    engine = two_slots.app.state.engine  # type: ignore[attr-defined]
    prompt = GENERATE_PROMPTS[0]

    def generate(name: str) -> str:
        body = {"adapter": name, "prompt": prompt, "max_new_tokens": BUSY_TOKENS}
        resp = two_slots.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["text"])

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(generate, name) for name in BUSY]
        deadline = time.monotonic() + 60
        while engine.running_generations < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running_generations == 2, "both slots should be generating"
        resp = two_slots.put(f"/admin/adapters/{OTHER}/pin", headers=admin_headers())
        during = _adapter(two_slots, OTHER)
        texts = [f.result() for f in running]
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "device_busy"
    assert during["pinned"] is False and during["tier"] != "device"
    for name, text in zip(BUSY, texts, strict=True):  # the running requests as if alone
        assert text.startswith(ref_adapters[name].texts[prompt]), name
    # once the slots are free, the same pin succeeds and holds
    ok = two_slots.put(f"/admin/adapters/{OTHER}/pin", headers=admin_headers())
    assert ok.status_code == 200, ok.text
    assert ok.json()["pinned"] is True and ok.json()["tier"] == "device"
    assert _adapter(two_slots, OTHER)["pinned"] is True
    unpinned = two_slots.delete(f"/admin/adapters/{OTHER}/pin", headers=admin_headers())
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False


def test_pin_of_an_adapter_whose_files_fail_to_load_is_409_and_changes_nothing(two_slots: TestClient) -> None:
    resp = two_slots.put("/admin/adapters/damaged/pin", headers=admin_headers())
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["type"] == "pin_failed" and "upload the adapter again" in err["message"]
    after = _adapter(two_slots, "damaged")
    assert after["pinned"] is False and after["tier"] == "store"
    # the server goes on: the other adapters serve and pin
    assert two_slots.put(f"/admin/adapters/{BUSY[0]}/pin", headers=admin_headers()).status_code == 200
    assert two_slots.delete(f"/admin/adapters/{BUSY[0]}/pin", headers=admin_headers()).status_code == 200


def test_pin_limit_is_409_and_changes_nothing(two_slots: TestClient) -> None:
    assert two_slots.put(f"/admin/adapters/{BUSY[0]}/pin", headers=admin_headers()).status_code == 200
    resp = two_slots.put(f"/admin/adapters/{BUSY[1]}/pin", headers=admin_headers())  # 1 = slots - 1
    assert resp.status_code == 409 and resp.json()["error"]["type"] == "conflict"
    assert _adapter(two_slots, BUSY[1])["pinned"] is False
    assert two_slots.delete(f"/admin/adapters/{BUSY[0]}/pin", headers=admin_headers()).status_code == 200
