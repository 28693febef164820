"""The Llama-shaped decoder families the model surface serves, on tiny randomly initialised configs
(2 layers, hidden 64; the default base's tokenizer): PEFT adapters made here, uploaded through the
admin route; /generate greedy text equals PeftModel's generate and /classify scores PeftModel's
softmax (≤ 1e-4)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from app.config import Settings
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, make_adapter, zip_folder

SMALL: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)


def _configs(vocab: int, ids: dict[str, int]) -> dict[str, PretrainedConfig]:
    kv = dict(num_key_value_heads=2, vocab_size=vocab, **ids)
    return {
        "qwen2": Qwen2Config(**SMALL, **kv),
        "qwen3": Qwen3Config(**SMALL, head_dim=16, **kv),
        "mistral": MistralConfig(**SMALL, **kv),
        "phi3": Phi3Config(**SMALL, num_key_value_heads=4, vocab_size=vocab, **ids),
        "gemma3_text": Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8, **kv),
    }


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral", "phi3", "gemma3_text"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def tiny(
    family: str, base_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict[str, RefAdapter]]]:
    tok = AutoTokenizer.from_pretrained(base_path)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.eos_token_id,
    }
    config = _configs(len(tok), ids)[family]
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    adapters_dir = tmp_path_factory.mktemp(f"tiny-{family}-adapters")
    refs = {
        "gen": make_adapter(
            folder, adapters_dir, "gen", "generate", seed=1, r=4, lora_alpha=8, target_modules="all-linear"
        ),
        "cls": make_adapter(
            folder,
            adapters_dir,
            "cls",
            "classify",
            seed=2,
            num_labels=3,
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
        ),
    }
    settings = Settings(
        base_model=str(folder),
        store=tmp_path_factory.mktemp(f"tiny-{family}-store"),
        admin_token=ADMIN_TOKEN,
        device="cpu",
        dtype="float32",  # type: ignore[arg-type]
    )
    with TestClient(create_app(settings)) as client:
        for name, ref in refs.items():
            resp = upload_archive(client, name, zip_folder(ref.folder))
            assert resp.status_code == 201, resp.text
        yield client, refs


def test_generation_equals_peft(tiny: tuple[TestClient, dict[str, RefAdapter]]) -> None:
    client, refs = tiny
    for prompt in GENERATE_PROMPTS:
        body = {"adapter": "gen", "prompt": prompt, "max_new_tokens": 10}
        resp = client.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        text = resp.json()["text"]
        assert text and text == refs["gen"].texts[prompt]
        events = client.post("/generate", json={**body, "stream": True}).text.splitlines()
        deltas = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
        assert "".join(d["text"] for d in deltas) == text


def test_classification_equals_peft(tiny: tuple[TestClient, dict[str, RefAdapter]]) -> None:
    client, refs = tiny
    resp = client.post("/classify", json={"adapter": "cls", "inputs": CLASSIFY_TEXTS})
    assert resp.status_code == 200, resp.text
    for result, expected in zip(resp.json()["results"], refs["cls"].probs, strict=True):
        got = [result["scores"][f"LABEL_{i}"] for i in range(3)]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-4
