"""Bottleneck adapters: served outputs equal a plain reference implementation, rows of LoRA,
bottleneck and base adapters in one batch equal each row alone, invalid uploads are refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from transformers import AutoTokenizer

from app.adapters.kinds import load_adapter
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.models.base_lm import BaseLM
from app.models.multi_lora import BASE_SLOT
from tests.conftest import CACHE_DIR, snapshot, upload_archive
from tests.helpers.bottleneck_ref import BottleneckRef, make_bottleneck, reference_model
from tests.helpers.harness import last_logits, wrapped_model
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, zip_files, zip_folder
from tests.helpers.versions import held

LABELS = ["negative", "positive", "neutral"]


@pytest.fixture(scope="module")
def bottlenecks(base_model: BaseLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BottleneckRef]:
    hidden, n = base_model.spec.hidden_size, base_model.model.config.num_hidden_layers
    out = tmp_path_factory.mktemp("bottlenecks")
    refs = [
        make_bottleneck(out, "bn-cls", "classify", hidden, n, seed=11, placement="both", labels=LABELS),
        make_bottleneck(
            out,
            "bn-gen",
            "generate",
            hidden,
            n,
            seed=12,
            placement="ffn",
            size=48,
            activation="gelu",
            scaling=2.0,
        ),
        make_bottleneck(
            out,
            "bn-attn",
            "generate",
            hidden,
            n,
            seed=13,
            placement="attention",
            size=16,
            activation="silu",
            layers=[0, 3, 7, n - 1],
            std=0.2,
        ),
    ]
    return {r.name: r for r in refs}


@pytest.fixture(scope="module")
def served(
    client: TestClient, bottlenecks: dict[str, BottleneckRef], uploaded: dict[str, RefAdapter]
) -> dict[str, BottleneckRef]:
    for name, ref in bottlenecks.items():
        resp = upload_archive(client, name, zip_folder(ref.folder), f"{name}.zip")
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["kind"] == "bottleneck" and body["rank"] == ref.config["bottleneck_size"]
        assert body["num_params"] == sum(t.numel() for t in ref.tensors.values())
    return bottlenecks


def test_classification_equals_the_reference(
    served: dict[str, BottleneckRef], client: TestClient, base_path: Path
) -> None:
    ref = served["bn-cls"]
    model = reference_model(base_path, ref)
    tok = AutoTokenizer.from_pretrained(base_path)
    with torch.inference_mode():
        encs = [tok(t, return_tensors="pt") for t in CLASSIFY_TEXTS]
        expected = [torch.softmax(model(**enc).logits[0], -1) for enc in encs]
        plain = reference_model(base_path, BottleneckRef(**{**vars(ref), "tensors": _head_only(ref)}))
        head_only = [torch.softmax(plain(**enc).logits[0], -1) for enc in encs]
    body = client.post("/classify", json={"adapter": "bn-cls", "inputs": CLASSIFY_TEXTS}).json()
    for result, probs, without in zip(body["results"], expected, head_only, strict=True):
        assert result["label"] == LABELS[int(probs.argmax())]
        for i, label in enumerate(LABELS):
            assert abs(result["scores"][label] - float(probs[i])) <= 1e-4, (label, result)
        assert (probs - without).abs().max() > 1e-3  # the bottleneck modules do change the scores


def _head_only(ref: BottleneckRef) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ref.tensors.items() if k.startswith("score.")}


def test_generation_equals_the_reference(
    served: dict[str, BottleneckRef], client: TestClient, base_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(base_path)
    bare = AutoModelForCausalLM.from_pretrained(base_path).eval()
    for name in ("bn-gen", "bn-attn"):
        model = reference_model(base_path, served[name])
        changed = 0
        for prompt in GENERATE_PROMPTS:
            enc = tok(prompt, return_tensors="pt")
            n = enc.input_ids.shape[1]
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=10, do_sample=False)[0, n:]
                plain = bare.generate(**enc, max_new_tokens=10, do_sample=False)[0, n:]
            expected = tok.decode(out, skip_special_tokens=True)
            body = {"adapter": name, "prompt": prompt, "max_new_tokens": 10}
            assert client.post("/generate", json=body).json()["text"] == expected, (name, prompt)
            changed += expected != tok.decode(plain, skip_special_tokens=True)
        assert changed, name  # the adapter does change the text


@pytest.fixture(scope="module")
def wrapped(base_path: Path) -> tuple[BaseLM, Runner, DeviceSlots]:
    return wrapped_model(base_path, CACHE_DIR, 8)


def test_mixed_batch_of_lora_bottleneck_and_base_rows_equals_each_alone(
    wrapped: tuple[BaseLM, Runner, DeviceSlots],
    bottlenecks: dict[str, BottleneckRef],
    ref_adapters: dict[str, RefAdapter],
    base_path: Path,
) -> None:
    base, runner, slots = wrapped
    folders = [
        ref_adapters["gen-all-rslora"].folder,
        bottlenecks["bn-gen"].folder,
        bottlenecks["bn-attn"].folder,
    ]
    infos = [held(f.name, load_adapter(f, base.spec, 64)) for f in folders]
    keep = {i.uid for i in infos}
    ids = [slots.acquire(i, i.weights, keep) for i in infos]  # type: ignore[arg-type]
    tok = base.tokenizer
    prompts = [GENERATE_PROMPTS[0], GENERATE_PROMPTS[1], GENERATE_PROMPTS[0], GENERATE_PROMPTS[1], "Hello"]
    order = [ids[1], ids[0], ids[2], BASE_SLOT, ids[1]]  # gelu and silu modules, LoRA and the base
    rows = [(s, tok(p)["input_ids"]) for s, p in zip(order, prompts, strict=True)]
    mixed = last_logits(base, runner, rows)
    for i, row in enumerate(rows):
        alone = last_logits(base, runner, [row])[0]
        assert (mixed[i] - alone).abs().max().item() <= 1e-4, f"row {i}"
    for i, name in ((0, "bn-gen"), (2, "bn-attn")):  # and the bottleneck rows equal the reference
        model = reference_model(base_path, bottlenecks[name])
        with torch.inference_mode():
            expected = model(input_ids=torch.tensor([rows[i][1]])).logits[0, -1]
        assert (mixed[i] - expected).abs().max().item() <= 1e-4, name
    # unloading frees the bottleneck banks too
    before = slots.bank_bytes
    for info in infos:
        slots.unload(info.uid)
    slots.compact()
    assert slots.bank_bytes == 0 < before


async def _post_all(url: str, bodies: list[dict[str, Any]]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        resps = await asyncio.gather(*(http.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    return [r.json()["text"] for r in resps]


def test_concurrent_decoding_of_mixed_kinds_equals_each_alone(
    served: dict[str, BottleneckRef], live_url: str, client: TestClient
) -> None:
    bodies = [
        {"adapter": a, "prompt": p, "max_new_tokens": 12}
        for a in ("bn-gen", "bn-attn", "gen-qv-r8", None)
        for p in GENERATE_PROMPTS
    ]
    alone = [client.post("/generate", json=b).json()["text"] for b in bodies]
    together = asyncio.run(_post_all(live_url, bodies))
    assert together == alone


def _variant(ref: BottleneckRef, config: dict[str, Any] | None = None, tensors: Any = None) -> bytes:
    cfg = {**ref.config, **(config or {})}
    ts = dict(ref.tensors)
    if tensors is not None:
        tensors(ts)
    buf = ref.folder.parent / "variant.safetensors"
    save_file({k: v.contiguous() for k, v in ts.items()}, str(buf))
    files = {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": buf.read_bytes()}
    if ref.labels:
        files["labels.json"] = json.dumps(ref.labels).encode()
    return zip_files(files)


def _set(key: str, value: torch.Tensor) -> Any:
    return lambda ts: ts.__setitem__(key, value)


def test_invalid_bottleneck_uploads_are_400_and_change_nothing(
    served: dict[str, BottleneckRef], client: TestClient, store_dir: Path
) -> None:
    gen, cls = served["bn-gen"], served["bn-cls"]
    k = "layers.2.ffn"
    nan = gen.tensors[f"{k}.up.weight"].clone()
    nan[0, 0] = float("nan")
    cases: dict[str, tuple[bytes, str]] = {
        "shape": (_variant(gen, tensors=_set(f"{k}.down.weight", torch.zeros(49, 576))), "shape"),
        "missing": (_variant(gen, tensors=lambda ts: ts.pop(f"{k}.up.bias")), "missing tensors"),
        "unexpected": (
            _variant(gen, tensors=_set("layers.2.attention.down.weight", torch.zeros(48, 576))),
            "unexpected",
        ),
        "nan": (_variant(gen, tensors=_set(f"{k}.up.weight", nan)), "NaN"),
        "int": (_variant(gen, tensors=_set(f"{k}.up.bias", torch.zeros(576, dtype=torch.int32))), "dtype"),
        "placement": (_variant(gen, {"placement": "middle"}), "placement"),
        "activation": (_variant(gen, {"activation": "sigmoid"}), "activation"),
        "too-wide": (_variant(gen, {"bottleneck_size": 4096}), "hidden size"),
        "layers": (_variant(gen, {"layers": [0, 999]}), "layers"),
        "field": (_variant(gen, {"adapter_residual_before_ln": True}), "unknown"),
        "size-mismatch": (_variant(gen, {"bottleneck_size": 47}), "shape"),
        "head-on-generate": (_variant(gen, tensors=_set("score.weight", torch.zeros(3, 576))), "head"),
        "no-head": (_variant(cls, tensors=lambda ts: ts.pop("score.weight")), "score.weight"),
        "task": (_variant(gen, {"task_type": "TOKEN_CLS"}), "task_type"),
    }
    before = snapshot(store_dir)
    for case, (data, needle) in cases.items():
        resp = upload_archive(client, f"bad-{case}", data)
        assert resp.status_code == 400, (case, resp.text)
        err = resp.json()["error"]
        assert err["type"] == "invalid_adapter" and needle in err["message"], (case, err)
    assert snapshot(store_dir) == before
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["bn-attn"]["kind"] == "bottleneck" and listed["bn-attn"]["target_modules"] == ["attention"]
