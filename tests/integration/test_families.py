"""Every served base family on a tiny randomly initialised config (2 layers, hidden 64): PEFT LoRA
adapters on every linear target (fused projections, GPT-2's Conv1D, BERT's pooler) and Houlsby
bottleneck adapters, made here and uploaded through the admin route. /classify scores equal PEFT's
(or the reference's) softmax within 1e-4, /generate greedy text equals PEFT's generate, streamed
equals non-streamed, mixed batches equal each row alone, and encoders refuse generation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from app.adapters.bottleneck_format import load_bottleneck
from app.adapters.lora_format import load_lora
from app.config import Settings
from app.engine.runner import Row
from app.main import create_app
from app.models.multi_lora import BASE_SLOT
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, expect_error, serve_live, upload_archive
from tests.helpers.bottleneck_ref import BottleneckRef, reference_model
from tests.helpers.captum_ref import assert_close, captum_scores
from tests.helpers.families import (
    DECODERS,
    ENCODERS,
    LABELS,
    bottleneck_probs,
    bottleneck_texts,
    make_family_adapters,
    tiny_base,
)
from tests.helpers.harness import last_logits, wrapped_model
from tests.helpers.joining import assert_joins_running_batch
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, zip_folder
from tests.helpers.versions import held


@dataclass
class Family:
    name: str
    base: Path
    client: TestClient
    probs: dict[str, list[list[float]]]  # classification adapter -> reference softmax per text
    texts: dict[str | None, dict[str, str]]  # generation adapter (None: base) -> prompt -> text
    refs: dict[str, RefAdapter | BottleneckRef]


@pytest.fixture(scope="module")
def families(base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Family]]:
    """Each family's tiny base, adapters and server, made once for every test that asks for it."""
    made: dict[str, Family] = {}
    with ExitStack() as stack:

        def get(name: str) -> Family:
            if name not in made:
                made[name] = _make(name, base_path, tmp_path_factory, stack)
            return made[name]

        yield get


@pytest.fixture(params=DECODERS + ENCODERS)
def family(request: pytest.FixtureRequest, families: Callable[[str], Family]) -> Family:
    return families(str(request.param))


@pytest.fixture(params=DECODERS)
def decoder(request: pytest.FixtureRequest, families: Callable[[str], Family]) -> Family:
    return families(str(request.param))


@pytest.fixture(params=ENCODERS)
def encoder(request: pytest.FixtureRequest, families: Callable[[str], Family]) -> Family:
    return families(str(request.param))


def _make(name: str, base_path: Path, tmp: pytest.TempPathFactory, stack: ExitStack) -> Family:
    base = tiny_base(name, base_path, tmp.mktemp(f"tiny-{name}"))
    refs = make_family_adapters(name, base, tmp.mktemp(f"tiny-{name}-adapters"))
    probs: dict[str, list[list[float]]] = {}
    texts: dict[str | None, dict[str, str]] = {}
    for key, ref in refs.items():
        if isinstance(ref, BottleneckRef):
            if ref.task == "classify":
                probs[key] = bottleneck_probs(base, ref)
            else:
                texts[key] = bottleneck_texts(base, ref)
        elif ref.task == "classify":
            probs[key] = ref.probs
        else:
            texts[key] = ref.texts
    if name in DECODERS:
        texts[None] = _bare_texts(base)
    settings = Settings(
        base_model=str(base),
        store=tmp.mktemp(f"tiny-{name}-store"),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        device="cpu",
        dtype="float32",
        max_new_tokens=256,
    )
    client = stack.enter_context(TestClient(create_app(settings)))
    for key, ref in refs.items():
        resp = upload_archive(client, key, zip_folder(ref.folder))
        assert resp.status_code == 201, resp.text
    return Family(name, base, client, probs, texts, refs)


def _bare_texts(base: Path) -> dict[str, str]:
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    texts = {}
    with torch.inference_mode():
        for prompt in GENERATE_PROMPTS:
            enc = tok(prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False)
            texts[prompt] = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def test_classification_equals_the_reference(family: Family) -> None:
    for adapter, expected in family.probs.items():
        resp = family.client.post("/classify", json={"adapter": adapter, "inputs": CLASSIFY_TEXTS})
        assert resp.status_code == 200, resp.text
        for result, want in zip(resp.json()["results"], expected, strict=True):
            got = [result["scores"][label] for label in LABELS]
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4, (adapter, got, want)


def test_generation_equals_the_reference_streamed_or_not(decoder: Family) -> None:
    family = decoder
    for adapter, expected in family.texts.items():
        for prompt in GENERATE_PROMPTS:
            body = {"adapter": adapter, "prompt": prompt, "max_new_tokens": GEN_TOKENS}
            resp = family.client.post("/generate", json=body)
            assert resp.status_code == 200, resp.text
            text = resp.json()["text"]
            assert text == expected[prompt], (adapter, prompt)
            events = family.client.post("/generate", json={**body, "stream": True}).text.splitlines()
            deltas = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
            assert "".join(d["text"] for d in deltas) == text
            if adapter is not None:  # the OpenAI route, with the adapter as the model
                completion = {"model": adapter, "prompt": prompt, "max_tokens": GEN_TOKENS, "temperature": 0}
                resp = family.client.post("/v1/completions", json=completion)
                assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == text, resp.text


def test_a_conversation_s_next_turn_reuses_its_prefix_exactly(decoder: Family) -> None:
    """The prefix cache on every decoder family: a second turn (the first turn's prompt and answer
    and a new line) reuses the first turn's keys and values, and answers what the same weights
    answer without them (a copy of each adapter uploaded under another name: a version whose tree
    is empty; the bare base: HF's generate), all of them prefilled together."""
    family = decoder
    opening = "Conversation: my order is late.\nAgent:"
    for key in ("gen", "gen-bn"):
        copy = upload_archive(family.client, f"{key}-copy", zip_folder(family.refs[key].folder))
        assert copy.status_code in (200, 201), copy.text
    seconds: dict[str | None, str] = {}
    for adapter in ("gen", "gen-bn", None):
        body = {"adapter": adapter, "prompt": opening, "max_new_tokens": GEN_TOKENS}
        first = family.client.post("/generate", json=body).json()
        seconds[adapter] = f"{opening}{first['text']}\nUser: and now?\nAgent:"
    # (an uncached row shorter than the cached rows' prompts: a prefill computes the widest
    # uncached part of its rows, so a long uncached row would make the others compute theirs again)
    rows = [(a, seconds[a]) for a in ("gen", "gen-bn", None)] + [("gen-copy", "Hi")]

    def ask(row: tuple[str | None, str]) -> dict[str, Any]:
        body = {"adapter": row[0], "prompt": row[1], "max_new_tokens": GEN_TOKENS}
        resp = family.client.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    with ThreadPoolExecutor(len(rows)) as pool:  # cached and uncached rows in shared prefills
        warm = list(pool.map(ask, rows))
    # Gemma 3's tiny config has a sliding window of 8 tokens: a longer generation is not cached
    # (its early tokens are gone from the sliding layers), and the answers stay the same
    windowed = family.name == "gemma3_text"
    assert all((w["usage"]["cached_tokens"] > 0) != windowed for w in warm[:3]), [w["usage"] for w in warm]
    assert warm[3]["usage"]["cached_tokens"] == 0
    cold = ask(("gen-copy", seconds["gen"]))
    assert cold["usage"]["cached_tokens"] == 0 and cold["text"] == warm[0]["text"]
    assert ask(("gen-bn-copy", seconds["gen-bn"]))["text"] == warm[1]["text"]
    model = AutoModelForCausalLM.from_pretrained(family.base).eval()
    tok = AutoTokenizer.from_pretrained(family.base)
    enc = tok(seconds[None], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False)
    assert warm[2]["text"] == tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_mixed_batches_equal_each_row_alone(family: Family) -> None:
    base, runner, slots = wrapped_model(family.base, CACHE_DIR, 4)
    tok = base.tokenizer

    def version(key: str) -> int:
        ref = family.refs[key]
        weights = (
            load_bottleneck(ref.folder, base.spec)
            if isinstance(ref, BottleneckRef)
            else load_lora(ref.folder, base.spec, 64)
        )
        info = held(key, weights)
        return slots.acquire(info, info.weights, set())

    cls, cls_bn = version("cls"), version("cls-bn")
    rows = [Row(s, tok(t)["input_ids"]) for s, t in zip([cls, cls_bn, cls_bn], CLASSIFY_TEXTS, strict=True)]
    rows.append(Row(BASE_SLOT, tok(CLASSIFY_TEXTS[0])["input_ids"], "embedding"))  # a bare embedding row
    mixed = runner.classify(rows, slots.heads)
    for i, row in enumerate(rows):
        alone = runner.classify([row], slots.heads)[0]
        assert max(abs(a - b) for a, b in zip(mixed[i], alone, strict=True)) <= 1e-5
    if family.name in ENCODERS:
        return
    gen, gen_bn = version("gen"), version("gen-bn")
    prompts = [*GENERATE_PROMPTS, GENERATE_PROMPTS[0]]
    rows = [(s, tok(p)["input_ids"]) for s, p in zip([gen, gen_bn, BASE_SLOT], prompts, strict=True)]
    together = last_logits(base, runner, rows)
    for i, row in enumerate(rows):
        assert (together[i] - last_logits(base, runner, [row])[0]).abs().max().item() <= 1e-4, f"row {i}"


def test_a_request_arriving_during_a_generation_joins_its_batch(decoder: Family) -> None:
    """A short request sent while a long one decodes finishes first (it was admitted into the
    running batch, not queued behind it), and neither output changes."""
    short = {"adapter": "gen", "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
    assert_joins_running_batch(
        decoder.client, GENERATE_PROMPTS[1], short, decoder.texts["gen"][GENERATE_PROMPTS[0]]
    )


def test_encoders_refuse_generation(encoder: Family) -> None:
    family = encoder
    client = family.client
    err = expect_error(
        client.post("/generate", json={"prompt": "Hello"}), 400, "generation_unsupported", "encoder"
    )
    assert family.name in err["message"]
    resp = client.post(
        "/v1/chat/completions", json={"model": "cls", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "generation_unsupported", resp.text
    models = client.get("/v1/models").json()["data"]  # the base embeds: /v1/embeddings takes it
    assert [m["id"] for m in models] == [client.get("/readyz").json()["model"]], models


def test_async_concurrent_classification_of_two_adapters(family: Family) -> None:
    """Concurrent requests for both classification adapters over real HTTP: each equals its reference."""

    async def post_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post("/classify", json={"adapter": a, "inputs": CLASSIFY_TEXTS})
                    for a in ["cls", "cls-bn"] * 3
                )
            )

    with serve_live(family.client.app) as url:
        resps = asyncio.run(post_all(url))
    for resp, adapter in zip(resps, ["cls", "cls-bn"] * 3, strict=True):
        assert resp.status_code == 200, resp.text
        for result, want in zip(resp.json()["results"], family.probs[adapter], strict=True):
            got = [result["scores"][label] for label in LABELS]
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4


def test_attributions_equal_captum_for_lora_and_bottleneck_adapters(family: Family) -> None:
    """Integrated gradients through /classify equal Captum's on the reference models (PEFT for
    LoRA, the hooked stock model for bottleneck adapters), on every family."""
    tok = AutoTokenizer.from_pretrained(family.base)
    text = CLASSIFY_TEXTS[0]
    for key in ("cls", "cls-bn"):
        ref = family.refs[key]
        body = {"adapter": key, "inputs": text, "explain": {"steps": 8, "target": LABELS[1]}}
        resp = family.client.post("/classify", json=body)
        assert resp.status_code == 200, resp.text
        (result,) = resp.json()["results"]
        if isinstance(ref, BottleneckRef):
            model = reference_model(family.base, ref).eval()
        else:
            cls = AutoModelForSequenceClassification.from_pretrained(family.base, num_labels=len(LABELS))
            cls.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            model = PeftModel.from_pretrained(cls, ref.folder).eval()
        embed = model.get_input_embeddings()
        scores, delta = captum_scores(
            lambda e, m=model: m(inputs_embeds=e).logits, embed, tok, text, 1, "integrated_gradients", 8
        )
        assert_close(result, scores, delta)
