"""The prefix cache through HTTP on the tiny model: a conversation's next turn reuses its prompt
and answer (``cached_tokens``) and answers exactly what it answers without the cache (the same
adapter uploaded under a second name: a version with an empty tree), for LoRA, bottleneck, the bare
base (against HF's generate), a merged composition, streamed requests and mixed prefill batches of
rows with and without a hit; a replaced adapter never reuses its old version's prefixes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.main import create_app
from app.models.base_lm import BaseLM
from tests.conftest import app_settings, upload_archive
from tests.helpers.bottleneck_ref import make_bottleneck
from tests.helpers.peft_ref import RefAdapter, zip_folder

CONV = "User: my parcel has not arrived and the tracking page shows nothing.\nAgent:"
TOKENS = 12


@pytest.fixture(scope="module")
def app(
    own_tiny: BaseLM, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("prefix")
    config = own_tiny.model.config
    bn = make_bottleneck(
        folder, "bn", "generate", int(config.hidden_size), int(config.num_hidden_layers), seed=5, std=0.2
    )
    folders = {
        "gen": ref_adapters["gen-qv-r8"].folder,
        "pat": ref_adapters["gen-pattern"].folder,
        "bn": bn.folder,
    }
    with TestClient(create_app(app_settings(folder / "store"), base=own_tiny)) as client:
        for name, path in folders.items():
            for copy in (name, f"{name}-cold"):  # the same weights, another version (tree)
                resp = upload_archive(client, copy, zip_folder(path), f"{copy}.zip")
                assert resp.status_code == 201, resp.text
        yield client


def generate(
    client: TestClient, adapter: str | list[str] | None, prompt: str, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": TOKENS, **extra}
    if isinstance(adapter, list):
        body |= {"adapters": adapter, "merge": "average"}
    else:
        body["adapter"] = adapter
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    if extra.get("stream"):
        lines = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
        events = [json.loads(line) for line in lines if line != "[DONE]"]
        return {"text": "".join(e.get("text", "") for e in events), "usage": events[-1]["usage"]}
    return dict(resp.json())


def next_turn(client: TestClient, adapter: str | list[str] | None, opening: str = CONV) -> str:
    """The first turn (answered), then the second turn's prompt."""
    return turns(client, adapter, opening)[0]


def turns(client: TestClient, adapter: str | list[str] | None, opening: str) -> tuple[str, int]:
    """The second turn's prompt, and the first turn's prompt tokens."""
    first = generate(client, adapter, opening)
    assert first["usage"]["cached_tokens"] == 0
    return f"{opening}{first['text']}\nUser: it was due on Monday.\nAgent:", first["usage"]["prompt_tokens"]


@pytest.mark.parametrize("hot", ["gen", "bn"])
def test_the_next_turn_reuses_the_conversation_and_answers_the_same(app: TestClient, hot: str) -> None:
    second, opening_tokens = turns(app, hot, CONV)
    warm = generate(app, hot, second)
    cold = generate(app, f"{hot}-cold", second)
    assert cold["usage"]["cached_tokens"] == 0
    # the first turn's prompt and answer come from the cache (up to where the answer's text,
    # tokenized again with what follows, gives other tokens than were generated)
    assert warm["usage"]["cached_tokens"] >= opening_tokens - 1
    assert warm["text"] == cold["text"] and warm["usage"]["completion_tokens"] > 0
    # streamed, the third time: the whole prompt but its last token is cached
    streamed = generate(app, hot, second, stream=True)
    assert streamed["text"] == cold["text"]
    assert streamed["usage"]["cached_tokens"] == warm["usage"]["prompt_tokens"] - 1


def test_the_bare_base_equals_hf_generate(app: TestClient, base_path: Path) -> None:
    second = next_turn(app, None, "Base model conversation: hello.\nAgent:")
    warm = generate(app, None, second)
    assert warm["usage"]["cached_tokens"] > 0
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    enc = tok(second, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False)
    assert warm["text"] == tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_a_merged_composition_has_a_tree_of_its_own(app: TestClient) -> None:
    opening = "Composition conversation: where is my refund?\nAgent:"
    second = next_turn(app, ["gen", "pat"], opening)
    warm = generate(app, ["gen", "pat"], second)
    cold = generate(app, ["gen-cold", "pat-cold"], second)
    assert warm["usage"]["cached_tokens"] > 0 and cold["usage"]["cached_tokens"] == 0
    assert warm["text"] == cold["text"]


def test_rows_with_and_without_a_hit_share_a_prefill(app: TestClient) -> None:
    opening = "Mixed conversation: the invoice is wrong.\nAgent:"
    seconds = {name: next_turn(app, name, opening) for name in ("gen", "bn")}
    fresh = "A prompt nobody sent before, about trains and rain."
    rows: list[tuple[str | None, str]] = [
        ("gen", seconds["gen"]),
        ("bn", seconds["bn"]),
        ("pat", fresh),
        (None, fresh),
    ]
    with ThreadPoolExecutor(len(rows)) as pool:
        mixed = list(pool.map(lambda row: generate(app, row[0], row[1]), rows))
    assert mixed[0]["usage"]["cached_tokens"] > 0 and mixed[1]["usage"]["cached_tokens"] > 0
    expected = [
        generate(app, "gen-cold", seconds["gen"]),
        generate(app, "bn-cold", seconds["bn"]),
        generate(app, "pat-cold", fresh),
    ]
    for got, want in zip(mixed, expected, strict=False):
        assert got["text"] == want["text"]
    assert generate(app, None, fresh)["text"] == mixed[3]["text"]  # (now from the cache)


def test_a_long_uncached_prompt_does_not_make_a_cached_turn_prefill_again(app: TestClient) -> None:
    opening = "Long conversation: the courier left the parcel outside.\nAgent:"
    second, opening_tokens = turns(app, "gen", opening)
    long_cold = "Weather report: " + " ".join(["rain and wind"] * 60)  # far longer than the new line
    rows = [("gen", second), ("pat", long_cold)]
    with ThreadPoolExecutor(len(rows)) as pool:
        hot, cold = pool.map(lambda row: generate(app, row[0], row[1]), rows)
    assert hot["usage"]["cached_tokens"] >= opening_tokens - 1 and cold["usage"]["cached_tokens"] == 0
    assert hot["text"] == generate(app, "gen-cold", second)["text"]
    assert cold["text"] == generate(app, "pat-cold", long_cold)["text"]


def test_a_replaced_adapter_never_reuses_the_old_version(
    app: TestClient, ref_adapters: dict[str, RefAdapter]
) -> None:
    opening = "Replacement conversation: my card was charged twice.\nAgent:"
    second = next_turn(app, "pat", opening)
    assert generate(app, "pat", second)["usage"]["cached_tokens"] > 0
    replaced = upload_archive(app, "pat", zip_folder(ref_adapters["gen-qv-r8"].folder), "pat.zip")
    assert replaced.status_code in (200, 201), replaced.text
    after = generate(app, "pat", second)
    assert after["usage"]["cached_tokens"] == 0  # the new version's tree is empty
    assert after["text"] == generate(app, "gen-cold", second)["text"]  # the new weights' answer
