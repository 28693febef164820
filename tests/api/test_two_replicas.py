"""Two replicas on one store, with requests in flight on both: uploads, replacements, pins,
compositions and deletions made through either one, and at the end one consistent state: each
replica's catalog equals the store (versions, compositions, pins), both list the same in
/v1/adapters, and each engine holds on its device exactly current versions (the pinned ones among
them), nothing retired."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.adapters.catalog import AdapterCatalog
from app.adapters.store import AdapterStore
from app.main import create_app
from app.models.base_lm import load_base_model
from tests.conftest import CACHE_DIR, admin_headers, app_settings, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, zip_folder

SYNC_S = 0.1
# every status a request may meet while its adapter is being replaced or deleted under it
IN_FLUX = {200, 404}


@pytest.fixture
def replicas(base_path: Path, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps, each with its own copy of the model and engine, on one store folder."""
    with ExitStack() as stack:
        clients = []
        for _ in range(2):
            settings = app_settings(tmp_path / "store", store_sync_interval_s=SYNC_S, max_device_adapters=6)
            base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
            clients.append(stack.enter_context(TestClient(create_app(settings, base=base))))
        yield clients[0], clients[1]


def _upload(client: TestClient, name: str, ref: RefAdapter) -> dict[str, Any]:
    resp = upload_archive(client, name, zip_folder(ref.folder), f"{name}.zip")
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def _ok(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp


def _eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the replicas did not converge"
        time.sleep(SYNC_S / 2)


class Traffic:
    """Clients sending requests to both replicas until stopped; every status is counted."""

    def __init__(self, calls: list[Callable[[], Any]]) -> None:
        self.statuses: Counter[int] = Counter()
        self.texts: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(call,), daemon=True) for call in calls]

    def _run(self, call: Callable[[], Any]) -> None:
        while not self._stop.is_set():
            resp = call()
            self.statuses[resp.status_code] += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _state(client: TestClient) -> dict[str, Any]:
    """What a replica says through /v1/adapters: versions, pins, compositions."""
    listing = _ok(client.get("/v1/adapters")).json()
    return {
        "adapters": {a["name"]: (a["version"], a["pinned"]) for a in listing["adapters"]},
        "compositions": {c["name"]: (c["version"], c["method"]) for c in listing["compositions"]},
    }


def test_changes_through_two_replicas_with_requests_in_flight_end_in_one_state(
    replicas: tuple[TestClient, TestClient], ref_adapters: dict[str, RefAdapter]
) -> None:
    a, b = replicas
    refs = ref_adapters
    _upload(a, "steady", refs["gen-qv-r8"])  # never changed: its text stays exact throughout
    _upload(b, "topic", refs["cls-4"])
    _upload(a, "talk", refs["gen-all-rslora"])
    _eventually(lambda: _state(a) == _state(b))
    prompt = GENERATE_PROMPTS[0]

    def generate(client: TestClient, adapter: str) -> Callable[[], Any]:
        body = {"adapter": adapter, "prompt": prompt, "max_new_tokens": 12}
        return lambda: client.post("/generate", json=body)

    def classify(client: TestClient, adapter: str) -> Callable[[], Any]:
        return lambda: client.post("/classify", json={"adapter": adapter, "inputs": CLASSIFY_TEXTS})

    steady_texts: list[str] = []

    def steady() -> Any:
        resp = a.post("/generate", json={"adapter": "steady", "prompt": prompt, "max_new_tokens": 10})
        steady_texts.append(resp.json().get("text", ""))
        return resp

    calls = [generate(a, "talk"), generate(b, "talk"), classify(a, "topic"), classify(b, "topic"), steady]
    calls += [generate(b, "pair"), generate(a, "pair")]  # a composition that comes and goes
    with Traffic(calls) as traffic:
        _upload(b, "talk", refs["gen-pattern"])  # replace through B while A serves it
        _ok(a.put("/admin/adapters/topic/pin", headers=admin_headers()))
        _upload(a, "topic", refs["cls-4"])  # replace a pinned adapter: the pin stays with the name
        pair = {"name": "pair", "members": ["talk", "steady"], "method": "average"}
        _ok(b.post("/admin/compositions", json=pair, headers=admin_headers()), 201)
        _upload(a, "extra", refs["cls-pattern"])
        _ok(b.put("/admin/adapters/extra/pin", headers=admin_headers()))
        time.sleep(0.5)  # requests on the composition while its member is replaced
        _upload(a, "talk", refs["gen-qv-r8"])
        _ok(b.delete("/admin/adapters/extra/pin", headers=admin_headers()))
        _ok(a.delete("/admin/compositions/pair", headers=admin_headers()), 204)
        _ok(b.delete("/admin/adapters/extra", headers=admin_headers()), 204)
        time.sleep(0.5)
    assert set(traffic.statuses) <= IN_FLUX, traffic.statuses
    assert traffic.statuses[200] > 20, traffic.statuses
    assert set(steady_texts) == {refs["gen-qv-r8"].texts[prompt]}

    # one state: both replicas agree with each other and with the store
    _eventually(lambda: _state(a) == _state(b))
    final = _state(a)
    assert final["adapters"] == {"steady": (1, False), "topic": (2, True), "talk": (3, False)}
    assert final["compositions"] == {}
    for client in (a, b):
        catalog: AdapterCatalog = client.app.state.catalog  # type: ignore[attr-defined]
        store: AdapterStore = catalog.store
        live = {n: m.version for n, m in store.state().items() if not m.deleted}
        assert {r.name: r.version for r in catalog.adapters()} == live
        assert catalog.compositions() == []
        for name, versions in store.composition_versions.items():  # only tombstones are left
            assert store.composition_record(name, max(versions)).get("deleted"), name
        assert {n for n in live if catalog.pinned(n)} == set(store.pins) == {"topic"}
        current = {r.uid for r in catalog.adapters()}
        engine = client.app.state.engine  # type: ignore[attr-defined]
        _eventually(lambda engine=engine, current=current: engine.device_uids() <= current)
        assert catalog.get("topic").uid in engine.device_uids()  # pinned: on the device
        # every adapter serves its current version's exact outputs on both replicas
        text = _ok(generate(client, "talk")()).json()["text"]
        assert text.startswith(refs["gen-qv-r8"].texts[prompt])
        scores = _ok(classify(client, "topic")()).json()["results"]
        labels = refs["cls-4"].labels
        for row, probs in zip(scores, refs["cls-4"].probs, strict=True):
            assert all(abs(row["scores"][lab] - p) <= 1e-4 for lab, p in zip(labels, probs, strict=True))
