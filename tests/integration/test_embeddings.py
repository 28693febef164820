"""Sentence embeddings (POST /embed, POST /v1/embeddings): the bare encoder bases against
sentence-transformers' ``encode`` of the same folders, through the official OpenAI client; PEFT
``FEATURE_EXTRACTION`` LoRA adapters against PEFT's own model with the same pooling, on an encoder
(mean pooling) and the default decoder (last token); embedding and classification rows of one
batch each equal to their requests alone."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, TaskType, get_peft_model
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel, AutoTokenizer

from app.main import create_app
from app.models.base_lm import resolve_model_path
from tests.conftest import CACHE_DIR, app_settings, expect_error, serve_live, upload_archive
from tests.helpers.bottleneck_ref import make_bottleneck, reference_model
from tests.helpers.families import encoder_tokenizer_path, make_family_adapters
from tests.helpers.peft_ref import zip_folder

TEXTS = [
    "The cat sat on the mat.",
    "Shares rose after the quarterly results were published on Monday morning.",
    "什么是机器学习？",
    "Where is my refund?",
]


def _folder(name: str) -> Path:
    return (
        encoder_tokenizer_path()
        if name == "minilm"
        else resolve_model_path("multilingual-e5-small", CACHE_DIR)[0]
    )


@pytest.fixture(scope="module", params=["minilm", "e5"])
def encoder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, TestClient]]:
    folder = _folder(str(request.param))
    settings = app_settings(tmp_path_factory.mktemp("store"), base_model=str(folder))
    with TestClient(create_app(settings)) as client:
        yield folder, client


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_base_embeddings_equal_sentence_transformers(encoder: tuple[Path, TestClient]) -> None:
    folder, client = encoder
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="any", http_client=client, max_retries=0)
    model = oa.models.list().data[0].id
    out = oa.embeddings.create(model=model, input=TEXTS)
    got = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
    assert got.shape == want.shape
    assert _cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # both bases: Normalize
    assert out.usage.prompt_tokens == sum(
        len(AutoTokenizer.from_pretrained(folder)(t)["input_ids"]) for t in TEXTS
    )
    # base64 (what the client asks for by default when no encoding_format is given) is the same floats
    raw = client.post("/v1/embeddings", json={"model": model, "input": TEXTS[0], "encoding_format": "base64"})
    floats = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(floats, got[0], atol=1e-6)
    # dimensions: the first n, unit length again
    short = client.post("/embed", json={"inputs": TEXTS[:2], "dimensions": 64}).json()
    vecs = np.array(short["embeddings"])
    assert vecs.shape == (2, 64) and short["dimensions"] == 64
    want64 = got[:2, :64] / np.linalg.norm(got[:2, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(vecs, want64, atol=1e-5)
    # token ids as input equal the text they encode
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[1])["input_ids"]
    by_ids = oa.embeddings.create(model=model, input=[ids], encoding_format="float").data[0].embedding
    np.testing.assert_allclose(np.array(by_ids), got[1], atol=1e-5)


def test_embedding_errors(encoder: tuple[Path, TestClient]) -> None:
    _, client = encoder
    model = client.get("/v1/models").json()["data"][0]["id"]
    expect_error(client.post("/embed", json={"inputs": ["ok", " "]}), 422, "invalid_request")
    expect_error(
        client.post("/embed", json={"inputs": "a", "dimensions": 4096}), 422, "invalid_request", "dimensions"
    )
    resp = client.post("/v1/embeddings", json={"model": "nope", "input": "a"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found", resp.text
    resp = client.post("/v1/embeddings", json={"model": model, "input": [[10**9]]})
    assert resp.status_code in (400, 422) and "error" in resp.json(), resp.text


def _feature_lora(base: Path, out: Path, seed: int, targets: str | list[str] = "all-linear") -> Path:
    """A PEFT FEATURE_EXTRACTION LoRA on the bare backbone (AutoModel), with random weights."""
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        r=8,
        lora_alpha=16,
        target_modules=targets,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.05)
    peft_model.save_pretrained(str(out))
    return out


def _peft_embeddings(base: Path, folder: Path, texts: list[str], pooling: str) -> np.ndarray:
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(base, dtype=torch.float32), str(folder)
    ).eval()
    vecs = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            v = hidden.mean(0) if pooling == "mean" else hidden[-1]
            vecs.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    return np.stack(vecs)


def test_lora_embedding_adapter_equals_peft_and_mixes_with_classification(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """MiniLM: a FEATURE_EXTRACTION LoRA equals PEFT's model mean-pooled; its rows and a
    classification adapter's rows sent together (one batch) equal each sent alone."""
    base = encoder_tokenizer_path()
    tmp = tmp_path_factory.mktemp("embed-lora")
    folder = _feature_lora(base, tmp / "emb", seed=3)
    want = _peft_embeddings(base, folder, TEXTS, "mean")
    classifiers = make_family_adapters("bert", base, tmp / "cls", bottleneck=False)
    settings = app_settings(tmp / "store", base_model=str(base), max_batch_wait_ms=50)
    with TestClient(create_app(settings)) as client:
        assert upload_archive(client, "emb", zip_folder(folder)).status_code == 201
        cls_name, cls_ref = "cls", classifiers["cls"]
        assert upload_archive(client, cls_name, zip_folder(cls_ref.folder)).status_code == 201
        listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
        assert listed["emb"]["task"] == "embed"
        alone = client.post("/embed", json={"adapter": "emb", "inputs": TEXTS}).json()
        np.testing.assert_allclose(np.array(alone["embeddings"]), want, atol=1e-4)
        expect_error(
            client.post("/embed", json={"adapter": cls_name, "inputs": "x"}), 409, "adapter_task_mismatch"
        )
        expect_error(
            client.post("/classify", json={"adapter": "emb", "inputs": "x"}), 409, "adapter_task_mismatch"
        )
        cls_alone = client.post("/classify", json={"adapter": cls_name, "inputs": TEXTS}).json()["results"]

        async def together(url: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                embeds = [http.post("/embed", json={"adapter": "emb", "inputs": [t]}) for t in TEXTS]
                bare = [http.post("/embed", json={"inputs": [t]}) for t in TEXTS]
                classes = [http.post("/classify", json={"adapter": cls_name, "inputs": [t]}) for t in TEXTS]
                out = await asyncio.gather(*embeds, *bare, *classes)
            return [r.json() for r in out[: 2 * len(TEXTS)]], [r.json() for r in out[2 * len(TEXTS) :]]

        bare_alone = np.array(client.post("/embed", json={"inputs": TEXTS}).json()["embeddings"])
        before = _classify_batches(client)
        with serve_live(client.app) as url:
            embeds, classes = asyncio.run(together(url))
        assert _classify_batches(client) - before < 3 * len(TEXTS)  # rows of several requests shared batches
        got = np.array([e["embeddings"][0] for e in embeds])  # type: ignore[index]
        np.testing.assert_allclose(got[: len(TEXTS)], np.array(alone["embeddings"]), atol=1e-5)
        np.testing.assert_allclose(got[len(TEXTS) :], bare_alone, atol=1e-5)
        for one, ref in zip(classes, cls_alone, strict=True):
            scores = one["results"][0]["scores"]  # type: ignore[index]
            assert max(abs(scores[k] - ref["scores"][k]) for k in ref["scores"]) <= 1e-5


def _classify_batches(client: TestClient) -> float:
    """Classification-lane forwards so far (embedding rows run there too)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('adapterserve_batch_size_count{task="classify"}'):
            return float(line.split()[-1])
    return 0.0


def test_bottleneck_embedding_adapter_equals_reference(
    encoder: tuple[Path, TestClient], tmp_path: Path
) -> None:
    """A bottleneck adapter for embeddings (task_type FEATURE_EXTRACTION) equals the stock model
    with the same modules hooked in, mean-pooled and normalized."""
    folder, client = encoder
    config = AutoConfig.from_pretrained(folder)
    ref = make_bottleneck(
        tmp_path, "emb-bn", "embed", hidden=int(config.hidden_size), num_layers=int(config.num_hidden_layers),
        seed=7, placement="both", size=16, activation="gelu", std=0.1,
    )  # fmt: skip
    assert upload_archive(client, "emb-bn", zip_folder(ref.folder)).status_code == 201
    got = np.array(client.post("/embed", json={"adapter": "emb-bn", "inputs": TEXTS}).json()["embeddings"])
    model, tok = reference_model(folder, ref), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        want = [
            torch.nn.functional.normalize(
                model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0), dim=-1
            )
            for t in TEXTS
        ]
    np.testing.assert_allclose(got, torch.stack(want).numpy(), atol=1e-4)


def test_decoder_embeddings_pool_the_last_token(client: TestClient, base_path: Path, tmp_path: Path) -> None:
    """The default decoder base: the bare base and a FEATURE_EXTRACTION LoRA (saved on the bare
    LlamaModel) pool the last token's state, normalized, as PEFT's model computes it."""
    folder = _feature_lora(base_path, tmp_path / "dec-emb", seed=4, targets=["q_proj", "v_proj", "up_proj"])
    assert upload_archive(client, "dec-emb", zip_folder(folder)).status_code == 201
    texts = TEXTS[:2]
    got = np.array(client.post("/embed", json={"adapter": "dec-emb", "inputs": texts}).json()["embeddings"])
    np.testing.assert_allclose(got, _peft_embeddings(base_path, folder, texts, "last"), atol=1e-4)
    tok = AutoTokenizer.from_pretrained(base_path)
    bare = AutoModel.from_pretrained(base_path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [
            torch.nn.functional.normalize(
                bare(**tok(t, return_tensors="pt")).last_hidden_state[0, -1], dim=-1
            )
            for t in texts
        ]
    base_id = client.get("/v1/models").json()["data"][0]["id"]
    out = client.post("/v1/embeddings", json={"model": base_id, "input": texts}).json()
    np.testing.assert_allclose(
        np.array([d["embedding"] for d in out["data"]]), torch.stack(want).numpy(), atol=1e-4
    )
    assert "dec-emb" in {m["id"] for m in client.get("/v1/models").json()["data"]}
