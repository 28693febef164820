"""A second real decoder family: Gemma 3 270M (sliding-window layers, 262k vocabulary), assembled
from its PyPI packages and converted once. PEFT LoRA adapters (every linear target) made here:
/generate greedy text equals PeftModel's, /classify scores its softmax within 1e-4, and a request
that arrives while a generation runs joins the running batch with both outputs unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.models.base_lm import resolve_model_path
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, upload_archive
from tests.helpers.bottleneck_ref import BottleneckRef
from tests.helpers.families import LABELS, bottleneck_probs, bottleneck_texts, make_family_adapters
from tests.helpers.joining import assert_joins_running_batch
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, zip_folder


@dataclass
class Gemma:
    client: TestClient
    probs: dict[str, list[list[float]]]
    texts: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gemma]:
    path, model_id = resolve_model_path("gemma-3-270m", CACHE_DIR)  # converted once per machine
    assert model_id == "gemma-3-270m"
    # LoRA here (bottleneck modules on Gemma 3 are checked on the tiny config of test_families.py)
    refs = make_family_adapters(
        "gemma3_text", path, tmp_path_factory.mktemp("gemma-adapters"), bottleneck=False
    )
    probs, texts = {}, {}
    for key, ref in refs.items():
        if ref.task == "classify":
            probs[key] = bottleneck_probs(path, ref) if isinstance(ref, BottleneckRef) else ref.probs
        else:
            texts[key] = bottleneck_texts(path, ref) if isinstance(ref, BottleneckRef) else ref.texts
    settings = Settings(
        base_model="gemma-3-270m",
        store=tmp_path_factory.mktemp("gemma-store"),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        device="cpu",
        dtype="float32",
        max_new_tokens=256,
    )
    with TestClient(create_app(settings)) as client:
        for key, ref in refs.items():
            resp = upload_archive(client, key, zip_folder(ref.folder))
            assert resp.status_code == 201, resp.text
        yield Gemma(client, probs, texts)


def test_generation_equals_the_reference(gemma: Gemma) -> None:
    for adapter, expected in gemma.texts.items():
        for prompt in GENERATE_PROMPTS:
            body = {"adapter": adapter, "prompt": prompt, "max_new_tokens": GEN_TOKENS}
            resp = gemma.client.post("/generate", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json()["text"] == expected[prompt], (adapter, prompt)


def test_classification_equals_the_reference(gemma: Gemma) -> None:
    for adapter, expected in gemma.probs.items():
        resp = gemma.client.post("/classify", json={"adapter": adapter, "inputs": CLASSIFY_TEXTS})
        assert resp.status_code == 200, resp.text
        for result, want in zip(resp.json()["results"], expected, strict=True):
            got = [result["scores"][label] for label in LABELS]
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4, (adapter, got, want)


def test_a_request_arriving_during_a_generation_joins_its_batch(gemma: Gemma) -> None:
    short = {"adapter": "gen", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
    assert_joins_running_batch(
        gemma.client, GENERATE_PROMPTS[1], short, gemma.texts["gen"][GENERATE_PROMPTS[0]], long_tokens=64
    )
