"""Adapter lifecycle through the public API: lazy loads, LRU eviction, pinning, versions, deletes."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import Generation, GenerationResult, Member, SamplingParams
from app.main import create_app
from app.models.base_lm import load_base_model
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, admin_headers
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, zip_folder

PLACED = ("cls-4", "cls-pattern", "gen-qv-r8", "gen-pattern", "gen-all-rslora")
LONG_PROMPT = "Write a very long essay about the sea."
LONG_TOKENS = 800  # ~2 s on the tiny model: the test acts while it runs


@pytest.fixture(scope="module")
def app_client(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """Two device slots and adapters placed in the store by hand (not uploaded, not preloaded)."""
    store = tmp_path_factory.mktemp("tier-store")
    for name in PLACED:
        shutil.copytree(ref_adapters[name].folder, store / name)
    settings = Settings(
        store=store,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        max_device_adapters=2,
        max_new_tokens=LONG_TOKENS,
        request_timeout_s=120,
        device="cpu",
    )
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    with TestClient(create_app(settings, base=base)) as c:
        yield c


def _tiers(client: TestClient) -> dict[str, str]:
    return {a["name"]: a["tier"] for a in client.get("/v1/adapters").json()["adapters"]}


def _metric(client: TestClient, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"adapterserve_{name}{{{want}}}" if labels else f"adapterserve_{name} "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _use(client: TestClient, name: str, refs: dict[str, RefAdapter]) -> None:
    """One request on ``name`` whose result must equal PEFT's."""
    ref = refs[name]
    if name.startswith("cls"):
        resp = client.post("/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS[0]})
        assert resp.status_code == 200, resp.text
        scores = resp.json()["results"][0]["scores"]
        got = [scores[label] for label in ref.labels]
        assert max(abs(a - b) for a, b in zip(got, ref.probs[0], strict=True)) <= 1e-4
    else:
        body = {"adapter": name, "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
        resp = client.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == ref.texts[GENERATE_PROMPTS[0]]


def _upload(client: TestClient, name: str, folder: Path) -> dict[str, Any]:
    resp = client.post(
        "/admin/adapters",
        headers=admin_headers(),
        data={"name": name},
        files={"file": (f"{name}.zip", zip_folder(folder), "application/zip")},
    )
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def _long_generation(client: TestClient, name: str) -> Future[GenerationResult]:
    """A long greedy generation on ``name`` admitted now, running on the engine while the test acts."""
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    catalog = client.app.state.catalog  # type: ignore[attr-defined]
    held = catalog.hold(name)
    prompt = client.app.state.service.tokenizer(LONG_PROMPT)["input_ids"]  # type: ignore[attr-defined]
    params = SamplingParams(max_new_tokens=LONG_TOKENS, ignore_eos=True)
    fut: Future[GenerationResult] = Future()

    def run() -> None:
        try:
            request = Generation(prompt, params, adapter=Member(held.record.handle, held.weights))
            fut.set_result(asyncio.run(engine.generate(request)))
        except BaseException as exc:  # surfaced by fut.result()
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + 10
    while engine.running_generations == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.running_generations == 1
    return fut


def test_first_request_loads_lazily_and_lru_evicts_in_order(
    app_client: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    assert set(_tiers(app_client).values()) == {"store"}  # nothing read at start
    loads = _metric(app_client, "adapter_loads_total", tier="host")
    _use(app_client, "cls-4", ref_adapters)
    assert _tiers(app_client)["cls-4"] == "device"
    assert _metric(app_client, "adapter_loads_total", tier="host") == loads + 1
    assert _tiers(app_client)["gen-qv-r8"] == "store"
    slots = app_client.app.state.engine.slots  # type: ignore[attr-defined]
    for name in ("gen-qv-r8", "cls-4", "gen-pattern"):  # 2 slots: gen-qv-r8 is the LRU one
        _use(app_client, name, ref_adapters)
    assert [i.name for i in slots.lru_order()] == ["cls-4", "gen-pattern"]
    tiers = _tiers(app_client)
    assert (tiers["gen-qv-r8"], tiers["cls-4"], tiers["gen-pattern"]) == ("host", "device", "device")
    _use(app_client, "gen-qv-r8", ref_adapters)  # reloaded from host; now cls-4 is the LRU one
    assert [i.name for i in slots.lru_order()] == ["gen-pattern", "gen-qv-r8"]
    assert _tiers(app_client)["cls-4"] == "host"
    assert _metric(app_client, "adapter_evictions_total", tier="device") >= 2
    assert _metric(app_client, "adapters_resident", tier="device") == 2


def test_a_pinned_adapter_is_never_evicted(
    app_client: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    resp = app_client.put("/admin/adapters/cls-pattern/pin", headers=admin_headers())
    assert resp.status_code == 200 and resp.json()["pinned"] and resp.json()["tier"] == "device"
    second = app_client.put("/admin/adapters/cls-4/pin", headers=admin_headers())
    assert second.status_code == 409 and second.json()["error"]["type"] == "conflict"
    for name in ("gen-qv-r8", "cls-4", "gen-pattern", "gen-all-rslora", "cls-pattern", "gen-qv-r8"):
        _use(app_client, name, ref_adapters)
        assert _tiers(app_client)["cls-pattern"] == "device"
    resp = app_client.delete("/admin/adapters/cls-pattern/pin", headers=admin_headers())
    assert resp.status_code == 200 and not resp.json()["pinned"]
    assert app_client.put("/admin/adapters/nope/pin", headers=admin_headers()).status_code == 404


def test_an_adapter_in_use_is_never_evicted(
    app_client: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    alone = _long_generation(app_client, "gen-qv-r8").result(timeout=60)
    running = _long_generation(app_client, "gen-qv-r8")
    for name in ("cls-4", "gen-pattern", "cls-pattern", "gen-all-rslora"):  # each needs the other slot
        _use(app_client, name, ref_adapters)
        assert _tiers(app_client)["gen-qv-r8"] == "device"
    assert not running.done(), "the long generation ended before the test was over; make it longer"
    assert running.result(timeout=60).token_ids == alone.token_ids


def test_a_new_version_serves_new_requests_while_running_ones_finish_on_the_old(
    app_client: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    v1_alone = _long_generation(app_client, "gen-qv-r8").result(timeout=60)
    assert _upload(app_client, "swap", ref_adapters["gen-qv-r8"].folder)["version"] == 1
    running = _long_generation(app_client, "swap")
    old_uid = app_client.app.state.catalog.get("swap").uid  # type: ignore[attr-defined]
    assert _upload(app_client, "swap", ref_adapters["gen-pattern"].folder)["version"] == 2
    assert not running.done()
    body = {"adapter": "swap", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
    assert (
        app_client.post("/generate", json=body).json()["text"]
        == ref_adapters["gen-pattern"].texts[GENERATE_PROMPTS[0]]
    )
    assert running.result(timeout=60).token_ids == v1_alone.token_ids  # old weights to the end
    slots = app_client.app.state.engine.slots  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5  # the retired version leaves its slot once unused
    while old_uid in slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old_uid not in slots


def test_delete_while_in_use(app_client: TestClient, ref_adapters: dict[str, RefAdapter]) -> None:
    expected = _long_generation(app_client, "gen-qv-r8").result(timeout=60)
    _upload(app_client, "doomed", ref_adapters["gen-qv-r8"].folder)
    running = _long_generation(app_client, "doomed")
    assert app_client.delete("/admin/adapters/doomed", headers=admin_headers()).status_code == 204
    body = {"adapter": "doomed", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
    resp = app_client.post("/generate", json=body)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "adapter_not_found"
    assert running.result(timeout=60).token_ids == expected.token_ids
    assert "doomed" not in _tiers(app_client)


def test_concurrent_uploads_of_one_name_end_consistent(
    app_client: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    sources = ["gen-qv-r8", "gen-pattern"] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda src: (src, _upload(app_client, "race", ref_adapters[src].folder)), sources)
        )
    versions = sorted(meta["version"] for _, meta in results)
    assert versions == list(range(1, 9))
    last_src, last = max(results, key=lambda r: r[1]["version"])
    listed = app_client.get("/v1/adapters/race").json()
    assert listed["version"] == 8 and listed["sha256"] == last["sha256"]
    store = Path(app_client.app.state.settings.store)  # type: ignore[attr-defined]
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".")) == []  # no leftovers
    _use_as(app_client, "race", ref_adapters[last_src])


def _use_as(client: TestClient, name: str, ref: RefAdapter) -> None:
    body = {"adapter": name, "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
    assert client.post("/generate", json=body).json()["text"] == ref.texts[GENERATE_PROMPTS[0]]


def test_a_crash_mid_upload_leaves_the_store_consistent_after_restart(
    base_path: Path, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(ref_adapters["gen-qv-r8"].folder, store / "kept")
    half = store / ".tmp-0123abcd"  # an upload that died while writing its files
    shutil.copytree(ref_adapters["gen-pattern"].folder, half)
    weights = half / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(ref_adapters["gen-pattern"].folder, store / ".old-replaced")  # died mid-replace
    settings = Settings(store=store, device="cpu", max_device_adapters=2)
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    with TestClient(create_app(settings, base=base)) as client:
        assert sorted(_tiers(client)) == ["kept", "replaced"]
        assert sorted(p.name for p in store.iterdir()) == ["kept", "replaced"]
        _use_as(client, "kept", ref_adapters["gen-qv-r8"])
        _use_as(client, "replaced", ref_adapters["gen-pattern"])


def test_host_tier_keeps_its_byte_budget_in_lru_order_and_keeps_pinned(
    base_model: Any, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    from app.adapters.catalog import AdapterCatalog
    from app.adapters.lora_format import load_lora
    from app.adapters.store import folder_store

    folder = ref_adapters["gen-pattern"].folder
    size = load_lora(folder, base_model.spec, 64).nbytes
    for name in ("a", "b", "c", "d"):
        shutil.copytree(folder, tmp_path / name)
    catalog = AdapterCatalog.detached(folder_store(tmp_path), base_model.spec, 2 * size)
    metrics = catalog.metrics
    catalog.scan()
    asyncio.run(catalog.pin("a"))
    # two fit and "a" is pinned: c evicts b, b evicts c, d evicts b (the LRU unpinned one each time)
    for name in ("a", "b", "c", "b", "d"):
        held = catalog.hold(name)
        assert held.weights is not None and catalog.describe(held.record)["tier"] == "host"
    tiers = {r.name: catalog.describe(r)["tier"] for r in catalog.adapters()}
    assert tiers == {"a": "host", "b": "store", "c": "store", "d": "host"}
    assert metrics.adapter_evictions.labels(tier="host")._value.get() == 3
    assert metrics.adapter_resident_bytes.labels(tier="host")._value.get() == 2 * size
