"""Token attributions (POST /classify with ``explain``) equal Captum's ``IntegratedGradients`` and
``InputXGradient`` on ``inputs_embeds`` of the PEFT model with the same baseline, points and
target (scores within 1e-3 of the largest score, ``delta`` as Captum's convergence delta), for a
LoRA and a bottleneck adapter on the default decoder base, while plain requests share the engine
and keep their outputs; limits and bad targets are refused with clear errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import upload_archive
from tests.helpers.bottleneck_ref import make_bottleneck, reference_model
from tests.helpers.captum_ref import assert_close, captum_scores
from tests.helpers.peft_ref import CLASSIFY_TEXTS, RefAdapter, make_adapter, zip_files, zip_folder

TEXT = "The striker scored twice as the club won the league title on Sunday."


@pytest.fixture(scope="module")
def peft_cls4(base_path: Path, uploaded: dict[str, RefAdapter]) -> Any:
    ref = uploaded["cls-4"]
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=len(ref.labels))
    model.config.pad_token_id = AutoTokenizer.from_pretrained(base_path).pad_token_id
    return PeftModel.from_pretrained(model, ref.folder).eval()


@pytest.mark.parametrize(("method", "steps"), [("integrated_gradients", 16), ("gradient_x_input", 1)])
def test_lora_attributions_equal_captum_while_plain_requests_share_the_engine(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    base_path: Path,
    peft_cls4: Any,
    method: str,
    steps: int,
) -> None:
    tok = AutoTokenizer.from_pretrained(base_path)
    plain = uploaded["cls-pattern"]
    body = {
        "adapter": "cls-4",
        "inputs": [TEXT, "Shares fell sharply."],
        "explain": {"method": method, "steps": steps},
    }
    with ThreadPoolExecutor(4) as pool:
        explained = pool.submit(client.post, "/classify", json=body)
        others = [
            pool.submit(client.post, "/classify", json={"adapter": "cls-pattern", "inputs": CLASSIFY_TEXTS})
            for _ in range(3)
        ]
        for other in others:  # the plain requests' outputs are what they are alone
            resp = other.result()
            assert resp.status_code == 200, resp.text
            for result, probs in zip(resp.json()["results"], plain.probs, strict=True):
                got = [
                    result["scores"][label]
                    for label in sorted(result["scores"], key=lambda k: int(k.split("_")[1]))
                ]
                assert max(abs(a - b) for a, b in zip(got, probs, strict=True)) < 1e-4
        resp = explained.result()
    assert resp.status_code == 200, resp.text
    labels = uploaded["cls-4"].labels
    for text, result in zip(body["inputs"], resp.json()["results"], strict=True):
        assert result["explained"] == result["label"]
        target = labels.index(result["label"])
        scores, delta = captum_scores(
            lambda e: peft_cls4(inputs_embeds=e).logits,
            peft_cls4.get_input_embeddings(),
            tok,
            text,
            target,
            method,
            steps,
        )
        assert_close(result, scores, delta)
        tokens = result["attributions"]
        ids = tok(text).input_ids
        assert [t["special"] for t in tokens] == [i in tok.all_special_ids for i in ids]
        for t in tokens:  # offsets point into the text
            if not t["special"]:
                assert text[t["start"] : t["end"]] == t["token"]


def test_a_named_target_and_a_bottleneck_adapter_equal_captum(
    client: TestClient, base_model: Any, base_path: Path, tmp_path: Path
) -> None:
    hidden, n = base_model.spec.hidden_size, base_model.model.config.num_hidden_layers
    labels = ["negative", "positive", "neutral"]
    ref = make_bottleneck(
        tmp_path, "bn-explain", "classify", hidden, n, seed=21, placement="both", labels=labels
    )
    files = {p.name: p.read_bytes() for p in ref.folder.iterdir() if p.is_file()}
    assert upload_archive(client, "bn-explain", zip_files(files), "bn-explain.zip").status_code == 201
    body = {"adapter": "bn-explain", "inputs": TEXT, "explain": {"steps": 8, "target": "neutral"}}
    resp = client.post("/classify", json=body)
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    assert result["explained"] == "neutral"
    model = reference_model(base_path, ref).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    scores, delta = captum_scores(
        lambda e: model(inputs_embeds=e).logits,
        model.get_input_embeddings(),
        tok,
        TEXT,
        2,
        "integrated_gradients",
        8,
    )
    assert_close(result, scores, delta)


def test_limits_and_bad_targets_are_refused(client: TestClient, uploaded: dict[str, RefAdapter]) -> None:
    too_long = {"adapter": "cls-4", "inputs": "word " * 600, "explain": {"steps": 512}}
    resp = client.post("/classify", json=too_long)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "explain_refused", resp.text
    assert "EXPLAIN_MAX_PATH_TOKENS" in resp.json()["error"]["message"]
    bad = {"adapter": "cls-4", "inputs": TEXT, "explain": {"target": "weather"}}
    resp = client.post("/classify", json=bad)
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "explain.target", resp.text
    resp = client.post("/classify", json={"adapter": "cls-4", "inputs": TEXT, "explain": {"method": "lime"}})
    assert resp.status_code == 422, resp.text
    # the service still answers
    assert client.post("/classify", json={"adapter": "cls-4", "inputs": TEXT}).status_code == 200


def test_an_ensemble_explains_its_label_with_the_members_weighted_attributions(
    client: TestClient, uploaded: dict[str, RefAdapter], base_path: Path, peft_cls4: Any, tmp_path: Path
) -> None:
    labels = uploaded["cls-4"].labels
    other = make_adapter(
        base_path,
        tmp_path,
        "cls-4b",
        "classify",
        seed=9,
        labels=labels,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    assert upload_archive(client, "cls-4b", zip_folder(other.folder), "cls-4b.zip").status_code == 201
    members = [{"name": "cls-4", "weight": 2.0}, {"name": "cls-4b", "weight": 1.0}]
    body = {"adapters": members, "combine": "logits", "inputs": TEXT, "explain": {"steps": 8}}
    resp = client.post("/classify", json=body)
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    assert result["explained"] == result["label"]
    target = labels.index(result["label"])
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=len(labels))
    model.config.pad_token_id = tok.pad_token_id
    peft_b = PeftModel.from_pretrained(model, other.folder).eval()
    each = [
        captum_scores(
            lambda e, m=m: m(inputs_embeds=e).logits,
            m.get_input_embeddings(),
            tok,
            TEXT,
            target,
            "integrated_gradients",
            8,
        )
        for m in (peft_cls4, peft_b)
    ]
    scores = [(2 * a + b) / 3 for a, b in zip(each[0][0], each[1][0], strict=True)]
    delta = (2 * (each[0][1] or 0.0) + (each[1][1] or 0.0)) / 3
    assert_close(result, scores, delta)


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_a_quantized_base_explains_through_its_kernels(base_path: Path, tmp_path: Path, kind: str) -> None:
    """Gradients flow through the quantized kernels (the weights they compute with): the scores
    explain the logit (small delta with many points) and rank tokens as the float base does."""
    from app.config import Settings
    from app.main import create_app
    from app.models.base_lm import load_base_model
    from app.models.quantized_layers import QuantizedLinear
    from tests.conftest import ADMIN_TOKEN, CACHE_DIR

    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32", kind)
    settings = Settings(store=tmp_path / "store", admin_token=ADMIN_TOKEN, device="cpu", dtype="float32")  # type: ignore[arg-type]
    ref = make_adapter(
        base_path,
        tmp_path,
        "q-cls",
        "classify",
        seed=4,
        labels=["a", "b"],
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    with TestClient(create_app(settings, base=base)) as client:
        assert upload_archive(client, "q-cls", zip_folder(ref.folder), "q-cls.zip").status_code == 201
        resp = client.post(
            "/classify", json={"adapter": "q-cls", "inputs": TEXT, "explain": {"method": "gradient_x_input"}}
        )
        assert resp.status_code == 200, resp.text
        quantized = [a["score"] for a in resp.json()["results"][0]["attributions"]]
        target = resp.json()["results"][0]["label"]
    # what the backward passes kept is freed once no explanation runs
    layers = [m for m in base.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.grad_weight is None for m in layers)
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    peft = PeftModel.from_pretrained(model, ref.folder).eval()
    scores, _ = captum_scores(
        lambda e: peft(inputs_embeds=e).logits,
        peft.get_input_embeddings(),
        tok,
        TEXT,
        ["a", "b"].index(target),
        "gradient_x_input",
        1,
    )
    # the same explanation up to the format's rounding: strongly correlated with the float base's
    corr = torch.corrcoef(torch.tensor([quantized, scores]))[0, 1]
    assert corr > 0.9, (kind, corr, quantized, scores)
