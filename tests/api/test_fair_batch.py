"""Fair scheduling inside the generation batch, through HTTP on the tiny model: while a light
tenant decodes, the rows of a tenant over its share are set aside (their cache kept) and rejoin
afterwards, and every text is what it is without the light tenant (greedy, bit for bit)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from app.models.base_lm import BaseLM
from app.tenants import key_hash
from tests.conftest import app_settings, upload_all
from tests.helpers.peft_ref import RefAdapter

KEYS = {"flood": "flood-key-6", "quiet": "quiet-key-7"}
ROWS = 8  # the batch; the flood fills it, its share with the quiet tenant active is 4
FLOOD_TOKENS = 400


@pytest.fixture(scope="module")
def app(
    own_tiny: BaseLM, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("fair-batch")
    tenants = {name: {"keys": [key_hash(key)], "adapters": ["*"]} for name, key in KEYS.items()}
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    settings = app_settings(
        folder / "store",
        tenants_file=folder / "tenants.yaml",
        max_batch_size=ROWS,
        max_new_tokens=FLOOD_TOKENS,
    )
    with TestClient(create_app(settings, base=own_tiny)) as client:
        upload_all(client, {"gen-qv-r8": ref_adapters["gen-qv-r8"]})
        yield client


def _generate(client: TestClient, tenant: str, prompt: str, tokens: int, **extra: Any) -> Any:
    body = {"adapter": "gen-qv-r8", "prompt": prompt, "max_new_tokens": tokens, **extra}
    return client.post("/generate", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def _set_aside(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('adapterserve_tenant_rows_set_aside_total{tenant="flood"}'):
            return float(line.split()[-1])
    return 0.0


def _flood(client: TestClient, quiet: bool) -> tuple[list[str], str | None, list[str]]:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    finished: list[str] = []

    def one(i: int) -> str:
        resp = _generate(client, "flood", f"Order {i}: the parcel", FLOOD_TOKENS, min_tokens=FLOOD_TOKENS)
        assert resp.status_code == 200, resp.text
        finished.append(f"flood{i}")
        return str(resp.json()["text"])

    with ThreadPoolExecutor(ROWS) as pool:
        futures = [pool.submit(one, i) for i in range(ROWS)]
        deadline = time.monotonic() + 30
        while engine.running_generations < ROWS:
            assert time.monotonic() < deadline, "the flood never filled the batch"
            time.sleep(0.005)
        text = None
        if quiet:
            resp = _generate(client, "quiet", "The capital of France is", 6)
            assert resp.status_code == 200, resp.text
            finished.append("quiet")
            text = resp.json()["text"]
        return [f.result() for f in futures], text, finished


def test_a_light_tenant_sets_the_flood_aside_and_every_text_stays_the_same(app: TestClient) -> None:
    alone = _generate(app, "quiet", "The capital of France is", 6).json()["text"]
    flood_alone, _, _ = _flood(app, quiet=False)
    assert _set_aside(app) == 0  # one tenant: nothing set aside
    flood, quiet, finished = _flood(app, quiet=True)
    assert quiet == alone
    assert flood == flood_alone  # rows set aside and merged back continue exactly
    assert finished[0] == "quiet", finished
    assert _set_aside(app) >= ROWS // 2 - 1  # the flood's rows over its share (of 8, with quiet: 4)
    engine = app.app.state.engine  # type: ignore[attr-defined]
    assert engine.gen.parked is None and engine.running_generations == 0
