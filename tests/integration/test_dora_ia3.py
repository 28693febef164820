"""DoRA (PEFT ``use_dora``) and IA³ (PEFT ``IA3Config``) adapters against PEFT's own models: through
/classify (≤ 1e-4) and /generate (the same greedy text), alone and in mixed batches with LoRA and
bottleneck rows, on the default decoder and on the all-MiniLM-L6-v2 encoder; their files checked
as any adapter's (shapes, NaN, a DoRA config without magnitudes)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from app.adapters.kinds import load_adapter
from app.engine.runner import Row, Runner
from app.engine.slots import DeviceSlots
from app.main import create_app
from app.models.base_lm import BaseLM
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, app_settings, expect_error, serve_live, upload_archive
from tests.helpers.bottleneck_ref import BottleneckRef, make_bottleneck
from tests.helpers.families import bottleneck_probs, bottleneck_texts, encoder_tokenizer_path
from tests.helpers.harness import last_logits, wrapped_model
from tests.helpers.peft_ref import (
    CLASSIFY_TEXTS,
    GEN_TOKENS,
    GENERATE_PROMPTS,
    RefAdapter,
    make_adapter,
    zip_folder,
)
from tests.helpers.versions import held

LABELS = ["billing", "tech", "other"]
DECODER_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def decoder_refs(
    base_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, RefAdapter | BottleneckRef]:
    out = tmp_path_factory.mktemp("dora-ia3")
    lora = dict(r=4, lora_alpha=8, target_modules=DECODER_TARGETS)
    config = AutoConfig.from_pretrained(base_path)
    shape = dict(hidden=int(config.hidden_size), num_layers=int(config.num_hidden_layers), size=8, std=0.05)
    refs: dict[str, RefAdapter | BottleneckRef] = {
        "cls-dora": make_adapter(
            base_path, out, "cls-dora", "classify", 11, labels=LABELS, use_dora=True, **lora
        ),
        "gen-dora": make_adapter(base_path, out, "gen-dora", "generate", 12, use_dora=True, **lora),
        "cls-ia3": make_adapter(base_path, out, "cls-ia3", "classify", 13, labels=LABELS, ia3=True),
        "gen-ia3": make_adapter(base_path, out, "gen-ia3", "generate", 14, ia3=True),
        "gen-bn": make_bottleneck(out, "gen-bn", "generate", seed=15, activation="relu", **shape),
    }
    return refs


@pytest.fixture(scope="module")
def decoder(client: TestClient, decoder_refs: dict[str, RefAdapter | BottleneckRef]) -> TestClient:
    for name, ref in decoder_refs.items():
        resp = upload_archive(client, name, zip_folder(ref.folder))
        assert resp.status_code == 201, resp.text
        kind = "bottleneck" if isinstance(ref, BottleneckRef) else name.split("-")[1]
        assert resp.json()["kind"] == kind
    return client


def _close(result: dict[str, object], labels: list[str], want: list[float]) -> bool:
    scores = result["scores"]
    assert isinstance(scores, dict)
    return max(abs(scores[label] - p) for label, p in zip(labels, want, strict=True)) <= 1e-4


def test_decoder_adapters_equal_peft_alone(
    decoder: TestClient, decoder_refs: dict[str, RefAdapter | BottleneckRef]
) -> None:
    for name in ("cls-dora", "cls-ia3"):
        ref = decoder_refs[name]
        assert isinstance(ref, RefAdapter)
        results = decoder.post("/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS}).json()[
            "results"
        ]
        assert all(_close(r, ref.labels, p) for r, p in zip(results, ref.probs, strict=True)), name
    for name in ("gen-dora", "gen-ia3"):
        ref = decoder_refs[name]
        assert isinstance(ref, RefAdapter)
        for prompt in GENERATE_PROMPTS:
            body = {"adapter": name, "prompt": prompt, "max_new_tokens": GEN_TOKENS}
            assert decoder.post("/generate", json=body).json()["text"] == ref.texts[prompt], (name, prompt)


def test_decoder_generations_in_one_batch_equal_peft(
    decoder: TestClient,
    live_url: str,
    decoder_refs: dict[str, RefAdapter | BottleneckRef],
    uploaded: dict[str, RefAdapter],
    base_path: Path,
) -> None:
    """DoRA, IA³, LoRA and bottleneck generations sent together (they share decode batches)."""
    bn = decoder_refs["gen-bn"]
    assert isinstance(bn, BottleneckRef)
    want = {"gen-bn": bottleneck_texts(base_path, bn)}
    for name in ("gen-dora", "gen-ia3"):
        ref = decoder_refs[name]
        assert isinstance(ref, RefAdapter)
        want[name] = ref.texts
    want["gen-qv-r8"] = uploaded["gen-qv-r8"].texts

    async def together() -> list[tuple[str, str, str]]:
        async with httpx.AsyncClient(base_url=live_url, timeout=120) as http:

            async def one(name: str, prompt: str) -> tuple[str, str, str]:
                body = {"adapter": name, "prompt": prompt, "max_new_tokens": GEN_TOKENS}
                resp = await http.post("/generate", json=body)
                return name, prompt, resp.json()["text"]

            return await asyncio.gather(*(one(n, p) for n in want for p in GENERATE_PROMPTS))

    for name, prompt, text in asyncio.run(together()):
        assert text == want[name][prompt], (name, prompt)


def test_mixed_forward_rows_equal_rows_alone_and_peft(
    base_path: Path, decoder_refs: dict[str, RefAdapter | BottleneckRef], ref_adapters: dict[str, RefAdapter]
) -> None:
    """One forward over DoRA, IA³, LoRA, bottleneck and bare rows (the engine's layers directly):
    each row's logits equal the row alone, and the adapters' equal PEFT's."""
    base, runner, slots = wrapped_model(base_path, CACHE_DIR, 8)
    names = ["gen-dora", "gen-ia3", "gen-bn"]
    versions = [held(n, load_adapter(decoder_refs[n].folder, base.spec, 64)) for n in names]
    versions.append(held("gen-qv-r8", load_adapter(ref_adapters["gen-qv-r8"].folder, base.spec, 64)))
    keep = {v.uid for v in versions}
    slot_ids = [slots.acquire(v, v.weights, keep) for v in versions]
    tok = base.tokenizer
    prompt = GENERATE_PROMPTS[0]
    rows = [(s, tok(prompt)["input_ids"]) for s in [*slot_ids, 0]]
    mixed = last_logits(base, runner, rows)
    for i, row in enumerate(rows):
        assert (mixed[i] - last_logits(base, runner, [row])[0]).abs().max().item() <= 1e-4, i
    for i, name in enumerate(["gen-dora", "gen-ia3"]):
        ref = decoder_refs[name]
        assert isinstance(ref, RefAdapter)
        assert (mixed[i] - ref.last_logits[prompt]).abs().max().item() <= 1e-4, name
    _classify_mix(base, runner, slots, decoder_refs)


def _classify_mix(
    base: BaseLM, runner: Runner, slots: DeviceSlots, refs: dict[str, RefAdapter | BottleneckRef]
) -> None:
    versions = [held(n, load_adapter(refs[n].folder, base.spec, 64)) for n in ("cls-dora", "cls-ia3")]
    ids = [slots.acquire(v, v.weights, {v.uid for v in versions}) for v in versions]
    tok = base.tokenizer
    rows = [Row(s, tok(t)["input_ids"]) for s in ids for t in CLASSIFY_TEXTS]
    mixed = runner.classify(rows, slots.heads)
    for row, probs in zip(rows, mixed, strict=True):
        alone = runner.classify([row], slots.heads)[0]
        assert max(abs(a - b) for a, b in zip(probs, alone, strict=True)) <= 1e-5
    for k, name in enumerate(("cls-dora", "cls-ia3")):
        ref = refs[name]
        assert isinstance(ref, RefAdapter)
        got = mixed[k * len(CLASSIFY_TEXTS) : (k + 1) * len(CLASSIFY_TEXTS)]
        assert all(
            max(abs(a - b) for a, b in zip(g, w, strict=True)) <= 1e-4
            for g, w in zip(got, ref.probs, strict=True)
        )


@pytest.fixture(scope="module")
def encoder(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, dict[str, RefAdapter | BottleneckRef]]]:
    base = encoder_tokenizer_path()
    out = tmp_path_factory.mktemp("enc-dora-ia3")
    config = AutoConfig.from_pretrained(base)
    hidden = int(config.hidden_size)
    refs: dict[str, RefAdapter | BottleneckRef] = {
        "cls-dora": make_adapter(
            base, out, "cls-dora", "classify", 21, labels=LABELS, r=4, lora_alpha=8,
            target_modules=["query", "value", "dense"], use_dora=True,
        ),
        "cls-ia3": make_adapter(base, out, "cls-ia3", "classify", 22, labels=LABELS, ia3=True),
        "cls-lora": make_adapter(
            base, out, "cls-lora", "classify", 23, labels=LABELS, r=4, lora_alpha=8,
            target_modules=["query", "value"],
        ),
        "cls-bn": make_bottleneck(
            out, "cls-bn", "classify", hidden=hidden, num_layers=int(config.num_hidden_layers),
            seed=24, activation="gelu", labels=LABELS, size=8, std=0.1,
            head={"classifier.weight": (len(LABELS), hidden), "classifier.bias": (len(LABELS),)},
        ),
    }  # fmt: skip
    settings = app_settings(out / "store", base_model=str(base), max_batch_wait_ms=50)
    with TestClient(create_app(settings)) as client:
        for name, ref in refs.items():
            assert upload_archive(client, name, zip_folder(ref.folder)).status_code == 201
        yield client, refs


def test_encoder_adapters_equal_peft_alone_and_together(
    encoder: tuple[TestClient, dict[str, RefAdapter | BottleneckRef]],
) -> None:
    client, refs = encoder
    base = encoder_tokenizer_path()
    want = {
        n: (bottleneck_probs(base, r) if isinstance(r, BottleneckRef) else r.probs) for n, r in refs.items()
    }
    for name in refs:
        results = client.post("/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS}).json()["results"]
        assert all(_close(r, LABELS, p) for r, p in zip(results, want[name], strict=True)), name

    async def together(url: str) -> list[tuple[str, int, dict[str, object]]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:

            async def one(name: str, i: int) -> tuple[str, int, dict[str, object]]:
                resp = await http.post("/classify", json={"adapter": name, "inputs": [CLASSIFY_TEXTS[i]]})
                return name, i, resp.json()["results"][0]

            return await asyncio.gather(*(one(n, i) for n in refs for i in range(len(CLASSIFY_TEXTS))))

    with serve_live(client.app) as url:
        for name, i, result in asyncio.run(together(url)):
            assert _close(result, LABELS, want[name][i]), (name, i)


def _edited(src: Path, dst: Path, change: object) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    assert callable(change)
    change(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_dora_and_ia3_files_are_refused(
    decoder: TestClient, decoder_refs: dict[str, RefAdapter | BottleneckRef], tmp_path: Path
) -> None:
    dora, ia3 = decoder_refs["gen-dora"].folder, decoder_refs["gen-ia3"].folder

    def magnitude_shape(t: dict[str, torch.Tensor]) -> None:
        key = next(k for k in t if k.endswith("lora_magnitude_vector"))
        t[key] = t[key][:-1].clone()

    def nan_scale(t: dict[str, torch.Tensor]) -> None:
        key = next(k for k in t if k.endswith("ia3_l"))
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    def ia3_shape(t: dict[str, torch.Tensor]) -> None:
        key = next(k for k in t if k.endswith("ia3_l"))
        t[key] = t[key].reshape(-1)[:-1].clone()

    def no_magnitudes(t: dict[str, torch.Tensor]) -> None:
        for key in [k for k in t if k.endswith("lora_magnitude_vector")]:
            del t[key]

    cases = [
        (dora, magnitude_shape, "shape"),
        (ia3, nan_scale, "NaN"),
        (ia3, ia3_shape, "shape"),
        (dora, no_magnitudes, "use_dora"),
    ]
    for i, (src, change, words) in enumerate(cases):
        folder = _edited(src, tmp_path / f"bad-{i}", change)
        err = expect_error(upload_archive(decoder, f"bad-{i}", zip_folder(folder)), 400, "invalid_adapter")
        assert words in err["message"], err
    config = json.loads((dora / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    composed = {
        "name": "dora-merge",
        "members": ["gen-dora", "gen-qv-r8"],
        "method": "linear",
    }
    resp = decoder.post(
        "/admin/compositions", json=composed, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.status_code == 400 and "only LoRA adapters merge" in resp.text, resp.text
