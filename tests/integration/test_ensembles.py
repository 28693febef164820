"""Classification ensembles on /classify: three members (two PEFT LoRA SEQ_CLS adapters, one with
its labels in another order, and a bottleneck adapter) combined by weighted mean, vote and logits
equal the combination of the three single-adapter responses, also while plain requests share the
batches; members with different label sets are refused."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import expect_error, upload_archive
from tests.helpers.bottleneck_ref import make_bottleneck
from tests.helpers.peft_ref import CLASSIFY_TEXTS, RefAdapter, make_adapter, zip_folder

LABELS = ["business", "sport", "tech", "politics"]  # cls-4's
MEMBERS = [
    {"name": "cls-4", "weight": 0.5},
    {"name": "ens-lora", "weight": 0.3},
    {"name": "ens-bn", "weight": 0.2},
]


@pytest.fixture(scope="module")
def members(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    base_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[str]:
    out = tmp_path_factory.mktemp("ensemble")
    lora = make_adapter(
        base_path,
        out,
        "ens-lora",
        "classify",
        seed=11,
        labels=LABELS[::-1],
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    bn = make_bottleneck(
        out, "ens-bn", "classify", hidden=576, num_layers=30, seed=12, size=16, labels=LABELS
    )
    for name, folder in (("ens-lora", lora.folder), ("ens-bn", bn.folder)):
        assert upload_archive(client, name, zip_folder(folder), f"{name}.zip").status_code == 201
    return [m["name"] for m in MEMBERS]  # type: ignore[misc]


def _single(client: TestClient, name: str) -> list[dict[str, float]]:
    resp = client.post("/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS})
    assert resp.status_code == 200, resp.text
    return [r["scores"] for r in resp.json()["results"]]


def _expected(
    rows: list[dict[str, float]], weights: list[float], method: str
) -> tuple[str, dict[str, float]]:
    total = sum(weights)
    mean = {lab: sum(w * r[lab] for r, w in zip(rows, weights, strict=True)) / total for lab in LABELS}
    if method == "mean":
        return max(mean, key=mean.__getitem__), mean
    if method == "logits":
        z = {
            lab: sum(w * math.log(r[lab]) for r, w in zip(rows, weights, strict=True)) / total
            for lab in LABELS
        }
        norm = sum(math.exp(v) for v in z.values())
        probs = {lab: math.exp(v) / norm for lab, v in z.items()}
        return max(probs, key=probs.__getitem__), probs
    votes = dict.fromkeys(LABELS, 0.0)
    for r, w in zip(rows, weights, strict=True):
        votes[max(r, key=r.__getitem__)] += w / total
    return max(LABELS, key=lambda lab: (votes[lab], mean[lab])), votes


@pytest.mark.parametrize("method", ["mean", "vote", "logits"])
def test_an_ensemble_equals_the_combination_of_its_members(
    client: TestClient, members: list[str], method: str
) -> None:
    singles = [_single(client, name) for name in members]
    weights = [float(m["weight"]) for m in MEMBERS]  # type: ignore[arg-type]
    body = {"adapters": MEMBERS, "combine": method, "inputs": CLASSIFY_TEXTS, "return_members": True}

    def ensemble() -> Any:
        return client.post("/classify", json=body)

    def plain(name: str) -> Any:
        return client.post("/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS})

    with ThreadPoolExecutor(4) as pool:  # plain rows share the ensemble's batches
        futures = [pool.submit(ensemble), pool.submit(plain, "cls-4"), pool.submit(plain, "cls-pattern")]
        resp, plain_4, _ = (f.result() for f in futures)
    assert resp.status_code == 200, resp.text
    body_out = resp.json()
    assert body_out["adapter"] == "cls-4+ens-lora+ens-bn"
    for got, single in zip(plain_4.json()["results"], singles[0], strict=True):
        assert got["scores"] == pytest.approx(single, abs=1e-5)
    for i, result in enumerate(body_out["results"]):
        label, scores = _expected([s[i] for s in singles], weights, method)
        assert result["label"] == label
        assert result["scores"] == pytest.approx(scores, abs=1e-4)
        assert result["score"] == pytest.approx(scores[label], abs=1e-4)
        assert [m["adapter"] for m in result["members"]] == members
        for member, single in zip(result["members"], singles, strict=True):
            assert member["scores"] == pytest.approx(single[i], abs=1e-4)


def test_plain_names_weigh_the_same_and_members_are_left_out_by_default(
    client: TestClient, members: list[str]
) -> None:
    resp = client.post("/classify", json={"adapters": members, "inputs": CLASSIFY_TEXTS[:1], "top_k": 2})
    assert resp.status_code == 200, resp.text
    result = resp.json()["results"][0]
    label, scores = _expected([s[0] for s in (_single(client, n) for n in members)], [1.0, 1.0, 1.0], "mean")
    assert result["label"] == label and "members" not in result and len(result["scores"]) == 2
    assert result["scores"][label] == pytest.approx(scores[label], abs=1e-4)


def test_ensemble_errors(client: TestClient, members: list[str]) -> None:
    resp = client.post("/classify", json={"adapters": ["cls-4", "cls-pattern"], "inputs": ["x"]})
    expect_error(resp, 400, "incompatible_members", "label set")
    resp = client.post("/classify", json={"adapters": ["cls-4", "gen-qv-r8"], "inputs": ["x"]})
    assert resp.status_code == 409
    resp = client.post("/classify", json={"adapters": ["cls-4", "nope"], "inputs": ["x"]})
    expect_error(resp, 404, "adapter_not_found", "nope")
    resp = client.post("/classify", json={"adapter": "cls-4", "adapters": ["cls-4"], "inputs": ["x"]})
    assert resp.status_code == 422
    resp = client.post("/classify", json={"adapters": ["cls-4", "cls-4"], "inputs": ["x"]})
    assert resp.status_code == 422
    resp = client.post("/classify", json={"adapters": [{"name": "cls-4", "weight": 0}], "inputs": ["x"]})
    assert resp.status_code == 422
