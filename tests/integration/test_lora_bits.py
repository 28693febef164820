"""``ADAPTERSERVE_LORA_BITS=4`` on an int4 base's native kernel: the served rows of two generation
adapters, the bare base and a classifier, in shared batches, follow HF PEFT on the same
dequantized base with the adapters' float32 weights, within the 4-bit weights' documented
tolerance (docs/quantization.md); the adapters' 4-bit copies are 40 % fewer bytes than 8-bit ones."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app import kernels
from app.config import Settings
from app.main import create_app
from app.models.base_lm import BaseLM, load_base_model
from app.models.quantized_layers import QuantizedEmbedding, QuantizedLinear
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, zip_folder
from tests.integration.test_quantization import _dequantized, _followed, peft_generators

# mean and largest gap (nats) of the served tokens' log-probabilities against PEFT's; probabilities
LORA4_GAP = (0.15, 1.0)  # (measured: 0.06, 0.33; 8-bit adapters 0.048, 0.19)
LORA4_PROBABILITIES = 3e-2  # (measured 0.010)
ADAPTERS = ("gen-qv-r8", "gen-pattern", "cls-4")


@pytest.fixture(scope="module")
def int4_base(base_path: Path) -> tuple[BaseLM, dict[str, torch.Tensor]]:
    if kernels.q4() is None:
        pytest.fail("the native int4 kernel did not build (a C++ compiler: make compiler)")
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32", "int4")
    weights = {
        name: mod.dequantized()
        for name, mod in base.model.named_modules()
        if isinstance(mod, QuantizedLinear | QuantizedEmbedding)
    }
    return base, weights


@pytest.fixture(scope="module")
def served4(
    int4_base: tuple[BaseLM, dict[str, torch.Tensor]],
    ref_adapters: dict[str, RefAdapter],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    settings = Settings(
        store=tmp_path_factory.mktemp("lora4store"),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        max_new_tokens=64,
        device="cpu",
        dtype="float32",
        lora_bits=4,
    )
    with TestClient(create_app(settings, base=int4_base[0])) as client:
        for name in ADAPTERS:
            ref = ref_adapters[name]
            assert upload_archive(client, name, zip_folder(ref.folder), f"{name}.zip").status_code == 201
        yield client


def test_four_bit_adapters_follow_peft_within_their_tolerance(
    int4_base: tuple[BaseLM, dict[str, torch.Tensor]],
    served4: TestClient,
    ref_adapters: dict[str, RefAdapter],
    base_path: Path,
) -> None:
    weights = int4_base[1]
    tok = AutoTokenizer.from_pretrained(base_path)
    peft, using = peft_generators(base_path, weights, "int4", tok, ref_adapters)

    cls = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=4)
    cls.config.pad_token_id = tok.pad_token_id
    cls = _dequantized(cls, weights, "int4", tok)
    cls = PeftModel.from_pretrained(cls, ref_adapters["cls-4"].folder).eval()
    with torch.inference_mode():
        expected = [torch.softmax(cls(**tok(t, return_tensors="pt")).logits[0], -1) for t in CLASSIFY_TEXTS]

    def generate(name: str | None, prompt: str) -> Any:
        body = {"adapter": name, "prompt": prompt, "max_new_tokens": GEN_TOKENS, "logprobs": 0}
        return served4.post("/generate", json=body)

    keys = [(name, prompt) for name in (None, "gen-qv-r8", "gen-pattern") for prompt in GENERATE_PROMPTS]
    gaps: dict[str | None, list[float]] = {}
    with ThreadPoolExecutor(8) as pool:  # the bare base, two adapters and a classifier in shared batches
        texts = {key: pool.submit(generate, *key) for key in keys}
        scores = pool.submit(served4.post, "/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})
        for (name, prompt), future in texts.items():
            resp = future.result()
            assert resp.status_code == 200, resp.text
            with using(name):
                gaps.setdefault(name, []).extend(_followed(peft, tok, prompt, resp.json()["logprobs"]))
        labels = ref_adapters["cls-4"].labels
        worst = 0.0
        for result, probs in zip(scores.result().json()["results"], expected, strict=True):
            for label, p in zip(labels, probs.tolist(), strict=True):
                worst = max(worst, abs(result["scores"][label] - p))
    for name, values in gaps.items():
        mean = sum(values) / len(values)
        print(f"\nint4, 4-bit adapters, {name}: gaps mean {mean:.4f}, max {max(values):.4f}")
    print(f"int4, 4-bit adapters: classifier probabilities within {worst:.4f}")
    everything = [g for values in gaps.values() for g in values]
    assert sum(everything) / len(everything) <= LORA4_GAP[0] and max(everything) <= LORA4_GAP[1]
    assert worst <= LORA4_PROBABILITIES
    engine: Any = served4.app.state.engine  # type: ignore[attr-defined]
    held = [m.loras8[s] for m in engine.layers.values() for s in m.loras8]
    assert held and all(isinstance(w, kernels.Lora4) for w in held)
    eight = sum(kernels.quantize_lora(*kernels.dequantize_lora(w)[:2], 1.0).nbytes for w in held)
    assert sum(w.nbytes for w in held) <= 0.65 * eight
