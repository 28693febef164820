"""Compositions against PEFT: merged LoRA adapters (cat, linear, ties) equal PEFT's
``add_weighted_adapter`` model (/classify probabilities, greedy /generate text); ensemble generation
at temperature 0 equals a loop that averages the members' PEFT next-token distributions step by
step, also while plain rows share the batch and when streamed; named compositions serve /classify,
/generate and the OpenAI client, are listed, survive a restart, and guard their members."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import admin_headers, expect_error, upload_archive
from tests.helpers.bottleneck_ref import make_bottleneck
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, make_adapter, zip_folder

LABELS = ["business", "sport", "tech", "politics"]  # cls-4's
TOKENS = 8
MERGES = [("cat", [0.7, 0.5], 1.0), ("linear", [1.0, 0.6], 1.0), ("ties", [1.0, 0.8], 0.5)]


@pytest.fixture(scope="module")
def extra(
    client: TestClient,
    uploaded: dict[str, RefAdapter],
    base_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, RefAdapter]:
    """A second generation adapter and a second classifier of rank 8 (linear and ties need one rank)."""
    out = tmp_path_factory.mktemp("compositions")
    made = {
        "mrg-gen": make_adapter(
            base_path, out, "mrg-gen", "generate", seed=21, r=8, lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
        "mrg-cls": make_adapter(
            base_path, out, "mrg-cls", "classify", seed=22, labels=LABELS[::-1], r=8, lora_alpha=8,
            target_modules=["q_proj", "v_proj", "gate_proj"],
        ),
    }  # fmt: skip
    bn = make_bottleneck(
        out, "mrg-bn", "classify", hidden=576, num_layers=30, seed=23, size=16, labels=LABELS
    )
    for name, folder in [*((n, r.folder) for n, r in made.items()), ("mrg-bn", bn.folder)]:
        assert upload_archive(client, name, zip_folder(folder), f"{name}.zip").status_code == 201
    return {**uploaded, **made}


def _lora_only(folder: Path, out: Path) -> Path:
    """A copy of a PEFT folder without the classification head and without a task (PEFT refuses to
    merge adapters that each carry a head)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "lora_" in k}, out / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(task_type=None, modules_to_save=None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _head(folder: Path, labels: list[str]) -> dict[str, torch.Tensor]:
    """The head's tensors of a classifier folder, label rows in LABELS order."""
    order = [labels.index(lab) for lab in LABELS]
    tensors = load_file(folder / "adapter_model.safetensors")
    return {k.rpartition("score.")[2]: v[order] for k, v in tensors.items() if ".score." in k}


def _peft_merged(base: Any, refs: list[RefAdapter], weights: list[float], method: str, density: float) -> Any:
    model = PeftModel.from_pretrained(base, refs[0].folder, adapter_name="m0")
    for i, ref in enumerate(refs[1:], 1):
        model.load_adapter(ref.folder, adapter_name=f"m{i}")
    names = [f"m{i}" for i in range(len(refs))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, density=density)
    model.set_adapter("merged")
    return model.eval()


@pytest.mark.parametrize(("method", "weights", "density"), MERGES)
def test_merged_generation_equals_peft(
    client: TestClient,
    extra: dict[str, RefAdapter],
    base_path: Path,
    method: str,
    weights: list[float],
    density: float,
) -> None:
    refs = [extra["gen-qv-r8"], extra["mrg-gen"]]
    tok = AutoTokenizer.from_pretrained(base_path)
    model = _peft_merged(AutoModelForCausalLM.from_pretrained(base_path), refs, weights, method, density)
    members = [{"name": r.name, "weight": w} for r, w in zip(refs, weights, strict=True)]
    for prompt in GENERATE_PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False)
        expected = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        body = {"adapters": members, "merge": method, "density": density, "prompt": prompt}
        resp = client.post("/generate", json={**body, "max_new_tokens": TOKENS})
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == expected
        assert resp.json()["adapter"] == "gen-qv-r8+mrg-gen"


@pytest.mark.parametrize(("method", "weights", "density"), MERGES)
def test_merged_classifier_equals_peft_with_the_mean_head(
    client: TestClient,
    extra: dict[str, RefAdapter],
    base_path: Path,
    tmp_path: Path,
    method: str,
    weights: list[float],
    density: float,
) -> None:
    refs = [extra["cls-4"], extra["mrg-cls"]]
    stripped = [RefAdapter(r.name, _lora_only(r.folder, tmp_path / r.name), "classify") for r in refs]
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=len(LABELS))
    base.config.pad_token_id = tok.pad_token_id
    heads = [_head(r.folder, r.labels) for r in refs]
    with torch.no_grad():  # the documented head rule: the weighted mean of the members' heads
        base.score.weight.copy_(
            sum(w * h["weight"] for w, h in zip(weights, heads, strict=True)) / sum(weights)
        )
    model = _peft_merged(base, stripped, weights, method, density)
    with torch.inference_mode():
        expected = [
            torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).tolist() for t in CLASSIFY_TEXTS
        ]
    members = [{"name": r.name, "weight": w} for r, w in zip(refs, weights, strict=True)]
    body = {"adapters": members, "merge": method, "density": density, "inputs": CLASSIFY_TEXTS}
    resp = client.post("/classify", json=body)
    assert resp.status_code == 200, resp.text
    for result, probs in zip(resp.json()["results"], expected, strict=True):
        for lab, p in zip(LABELS, probs, strict=True):
            assert abs(result["scores"][lab] - p) <= 1e-4, (method, lab)
        assert result["label"] == LABELS[max(range(4), key=probs.__getitem__)]


def _ensemble_reference(base_path: Path, refs: list[RefAdapter], weights: list[float], prompt: str) -> str:
    """Greedy decoding from the weighted mean of the members' PEFT next-token distributions."""
    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), refs[0].folder, "m0")
    for i, ref in enumerate(refs[1:], 1):
        model.load_adapter(ref.folder, adapter_name=f"m{i}")
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(TOKENS):
            mean = torch.zeros(model.config.vocab_size)
            for i, w in enumerate(weights):
                model.set_adapter(f"m{i}")
                mean += w * torch.softmax(model(ids).logits[0, -1], -1)
            token = int(mean.argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return str(tok.decode(new, skip_special_tokens=True))


ENSEMBLE = [{"name": "gen-qv-r8", "weight": 0.6}, {"name": "gen-all-rslora", "weight": 0.4}]


def test_ensemble_generation_equals_the_averaged_distributions(
    client: TestClient, extra: dict[str, RefAdapter], base_path: Path
) -> None:
    refs = [extra[m["name"]] for m in ENSEMBLE]  # type: ignore[index]
    weights = [float(m["weight"]) for m in ENSEMBLE]  # type: ignore[arg-type]
    prompt = GENERATE_PROMPTS[1]
    expected = _ensemble_reference(base_path, refs, weights, prompt)
    plain_ref = extra["gen-pattern"]
    body = {"adapters": ENSEMBLE, "merge": "average", "prompt": prompt, "max_new_tokens": TOKENS}

    def ensemble() -> Any:
        return client.post("/generate", json=body)

    def plain(p: str) -> Any:
        return client.post("/generate", json={"adapter": "gen-pattern", "prompt": p, "max_new_tokens": 10})

    with ThreadPoolExecutor(4) as pool:  # plain rows share the batches with the ensemble's rows
        futures = [
            pool.submit(ensemble),
            *(pool.submit(plain, p) for p in GENERATE_PROMPTS),
            pool.submit(ensemble),
        ]
        responses = [f.result() for f in futures]
    for resp in (responses[0], responses[-1]):
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == expected
    for resp, p in zip(responses[1:-1], GENERATE_PROMPTS, strict=True):
        assert resp.json()["text"] == plain_ref.texts[p]
    # the mean of one member's distribution is that member
    solo = client.post("/generate", json={**body, "adapters": ["gen-pattern"], "prompt": GENERATE_PROMPTS[0]})
    assert solo.json()["text"] == plain_ref.texts[GENERATE_PROMPTS[0]][: len(solo.json()["text"])]
    # streamed: the same text
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(e["text"] for e in events) == expected
    assert events[-1]["finish_reason"] in ("length", "stop")


def test_composition_errors(client: TestClient, extra: dict[str, RefAdapter]) -> None:
    mixed = [{"name": "cls-4"}, {"name": "gen-qv-r8"}]
    resp = client.post("/classify", json={"adapters": mixed, "inputs": "x"})
    expect_error(resp, 409, "adapter_task_mismatch", "gen-qv-r8")
    with_bn = {"adapters": ["cls-4", "mrg-bn"], "merge": "linear", "inputs": "x"}
    resp = client.post("/classify", json=with_bn)
    expect_error(resp, 400, "incompatible_members", "only LoRA adapters merge")
    ensemble = client.post("/classify", json={**with_bn, "merge": None})  # an ensemble takes any kinds
    assert ensemble.status_code == 200, ensemble.text
    expect_error(
        client.post(
            "/generate", json={"adapters": ["gen-qv-r8", "gen-pattern"], "merge": "linear", "prompt": "x"}
        ),
        400,
        "incompatible_members",
        "rank",
    )
    expect_error(
        client.post("/generate", json={"adapters": [{"name": "gen-qv-r8", "weight": -1}], "prompt": "x"}),
        422,
        "invalid_request",
    )
    expect_error(
        client.post(
            "/classify", json={"adapters": ["cls-4"], "merge": "cat", "combine": "vote", "inputs": "x"}
        ),
        422,
        "invalid_request",
    )


def _create(client: TestClient, body: dict[str, Any]) -> Any:
    return client.post("/admin/compositions", json=body, headers=admin_headers())


def test_named_compositions(
    client: TestClient, extra: dict[str, RefAdapter], store_dir: Path, live_url: str
) -> None:
    from openai import OpenAI

    ens = _create(client, {"name": "helpdesk-ens", "members": ENSEMBLE, "method": "average"})
    assert ens.status_code == 201, ens.text
    assert ens.json()["task"] == "generate" and [m["version"] for m in ens.json()["members"]] == [1, 1]
    halves = [{"name": "cls-4", "weight": 0.5}, {"name": "mrg-cls", "weight": 0.5}]
    merged = {"name": "topic-merge", "members": halves, "method": "cat"}
    assert _create(client, merged).status_code == 201
    # an adapter's name, an unknown member, a method that does not serve the task
    expect_error(_create(client, {**merged, "name": "cls-4"}), 409, "conflict")
    expect_error(_create(client, {**merged, "name": "x1", "members": ["nope"]}), 404, "adapter_not_found")
    expect_error(_create(client, {**merged, "name": "x2", "method": "average"}), 400, "incompatible_members")

    prompt = GENERATE_PROMPTS[0]
    adhoc = client.post(
        "/generate", json={"adapters": ENSEMBLE, "prompt": prompt, "max_new_tokens": TOKENS}
    ).json()["text"]
    named = client.post(
        "/generate", json={"adapter": "helpdesk-ens", "prompt": prompt, "max_new_tokens": TOKENS}
    )
    assert named.json() | {"usage": None} == {
        "adapter": "helpdesk-ens",
        "text": adhoc,
        "finish_reason": named.json()["finish_reason"],
        "usage": None,
    }
    scores = client.post("/classify", json={"adapter": "topic-merge", "inputs": CLASSIFY_TEXTS}).json()
    direct = client.post(
        "/classify", json={"adapters": halves, "merge": "cat", "inputs": CLASSIFY_TEXTS}
    ).json()
    assert scores["adapter"] == "topic-merge" and scores["results"] == direct["results"]
    expect_error(
        client.post("/generate", json={"adapter": "topic-merge", "prompt": "x"}), 409, "adapter_task_mismatch"
    )

    listed = client.get("/v1/adapters").json()["compositions"]
    assert {c["name"]: c["method"] for c in listed} == {"helpdesk-ens": "average", "topic-merge": "cat"}
    assert client.get("/v1/adapters/topic-merge").json()["kind"] == "composition"
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "helpdesk-ens" in models and "topic-merge" not in models

    oai = OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0)
    done = oai.completions.create(model="helpdesk-ens", prompt=prompt, max_tokens=TOKENS, temperature=0)
    assert done.choices[0].text == adhoc and done.model == "helpdesk-ens"
    chunks = oai.completions.create(
        model="helpdesk-ens", prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == adhoc
    messages = [{"role": "user", "content": "My order is late."}]
    chat = oai.chat.completions.create(model="helpdesk-ens", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    native = client.post(
        "/generate", json={"adapter": "helpdesk-ens", "messages": messages, "max_new_tokens": 6}
    )
    assert chat.choices[0].message.content == native.json()["text"]

    # a member that a composition uses cannot be deleted; replacing it makes the composition follow
    expect_error(
        client.delete("/admin/adapters/mrg-cls", headers=admin_headers()), 409, "conflict", "topic-merge"
    )
    expect_error(upload_archive(client, "topic-merge", zip_folder(extra["mrg-cls"].folder)), 409, "conflict")
    assert upload_archive(client, "mrg-cls", zip_folder(extra["cls-4"].folder)).status_code == 201
    assert client.get("/v1/adapters/topic-merge").json()["members"][1]["version"] == 2
    after = client.post("/classify", json={"adapter": "topic-merge", "inputs": CLASSIFY_TEXTS}).json()
    alone = client.post("/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS}).json()
    for a, b in zip(after["results"], alone["results"], strict=True):  # half of cls-4 twice: cls-4
        assert all(abs(a["scores"][k] - v) <= 1e-4 for k, v in b["scores"].items())

    # a new process on the same store serves the compositions it finds there
    from app.adapters.catalog import AdapterCatalog
    from app.adapters.store import folder_store

    spec = client.app.state.catalog.intake.spec  # type: ignore[attr-defined]
    fresh = AdapterCatalog.detached(folder_store(store_dir), spec)
    fresh.scan()
    assert {c.label: c.method for c in fresh.compositions()} == {
        "helpdesk-ens": "average",
        "topic-merge": "cat",
    }

    assert client.delete("/admin/compositions/topic-merge", headers=admin_headers()).status_code == 204
    assert client.delete("/admin/compositions/helpdesk-ens", headers=admin_headers()).status_code == 204
    expect_error(
        client.post("/classify", json={"adapter": "topic-merge", "inputs": "x"}), 404, "adapter_not_found"
    )
    assert upload_archive(client, "mrg-cls", zip_folder(extra["mrg-cls"].folder)).status_code == 201
    text = client.get("/metrics").text
    assert (
        'adapterserve_composition_request_duration_seconds_count{composition="topic-merge",endpoint="/classify"}'
        in text
    )
    assert "adapterserve_adapter_merges_total" in text
