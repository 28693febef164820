"""The OpenAI-compatible routes, driven by the official ``openai`` client against the ASGI app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from app.config import Settings
from app.main import create_app
from app.models.base_lm import load_base_model
from tests.conftest import CACHE_DIR
from tests.helpers.peft_ref import GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, peft_greedy

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def oa(client: TestClient, uploaded: dict[str, RefAdapter]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="any", http_client=client, max_retries=0)


def _chat_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def test_completion_equals_peft(
    oa: openai.OpenAI, uploaded: dict[str, RefAdapter], tok: PreTrainedTokenizerBase
) -> None:
    prompt = GENERATE_PROMPTS[1]
    for name in ("gen-qv-r8", "gen-pattern"):
        ref = uploaded[name]
        out = oa.completions.create(model=name, prompt=prompt, max_tokens=GEN_TOKENS, temperature=0)
        assert out.object == "text_completion" and out.model == name and out.id.startswith("cmpl-")
        (choice,) = out.choices
        assert choice.text == ref.texts[prompt]
        ids = ref.token_ids[prompt]
        assert choice.finish_reason == ("length" if len(ids) == GEN_TOKENS else "stop")
        assert out.usage is not None
        assert out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        assert out.usage.completion_tokens == len(ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_completion_equals_peft_on_the_chat_template(
    oa: openai.OpenAI, uploaded: dict[str, RefAdapter], tok: PreTrainedTokenizerBase, base_path: Path
) -> None:
    ref = uploaded["gen-all-rslora"]
    prompt_ids = _chat_ids(tok, CHAT)
    expected = peft_greedy(base_path, ref.folder, prompt_ids, 12)
    out = oa.chat.completions.create(model=ref.name, messages=CHAT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == tok.decode(expected, skip_special_tokens=True)
    new_tokens = [t for t in expected if t != tok.eos_token_id]
    assert choice.finish_reason == ("stop" if tok.eos_token_id in expected else "length")
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(new_tokens)
    assert out.usage.total_tokens == len(prompt_ids) + len(new_tokens)


def test_base_model_by_id_equals_the_bare_base(
    oa: openai.OpenAI, client: TestClient, base_id: str, tok: PreTrainedTokenizerBase, base_path: Path
) -> None:
    expected = peft_greedy(base_path, None, _chat_ids(tok, CHAT), 10)
    out = oa.chat.completions.create(model=base_id, messages=CHAT, max_completion_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert out.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    native = client.post("/generate", json={"messages": CHAT, "max_new_tokens": 10}).json()
    assert native["text"] == out.choices[0].message.content


def test_streaming_deltas_join_to_the_non_streamed_text(oa: openai.OpenAI) -> None:
    kwargs = {"model": "gen-all-rslora", "messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = oa.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        oa.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])

    prompt = GENERATE_PROMPTS[0]
    plain = oa.completions.create(model="gen-qv-r8", prompt=prompt, max_tokens=GEN_TOKENS, temperature=0)
    streamed = list(
        oa.completions.create(
            model="gen-qv-r8", prompt=prompt, max_tokens=GEN_TOKENS, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.usage is None for c in streamed)  # no usage chunk unless asked


def test_n_choices_prompts_echo_and_seeds(oa: openai.OpenAI, uploaded: dict[str, RefAdapter]) -> None:
    ref = uploaded["gen-qv-r8"]
    greedy = oa.completions.create(
        model="gen-qv-r8", prompt=GENERATE_PROMPTS, max_tokens=GEN_TOKENS, temperature=0, n=2, echo=True
    )
    texts = [c.text for c in sorted(greedy.choices, key=lambda c: c.index)]
    assert texts == [p + ref.texts[p] for p in GENERATE_PROMPTS for _ in range(2)]

    def sampled() -> list[str]:
        out = oa.chat.completions.create(
            model="gen-qv-r8",
            messages=CHAT,
            max_tokens=8,
            temperature=1.0,
            seed=7,
            n=3,  # type: ignore[arg-type]
        )
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.message.content or "" for c in out.choices]

    first = sampled()
    assert sampled() == first  # a seed makes the whole response reproducible
    assert len(set(first)) > 1  # choice i samples with seed + i


def test_stop_strings_and_token_prompts(oa: openai.OpenAI, tok: PreTrainedTokenizerBase) -> None:
    prompt = GENERATE_PROMPTS[0]
    full = oa.completions.create(model="gen-qv-r8", prompt=prompt, max_tokens=GEN_TOKENS, temperature=0)
    text = full.choices[0].text
    stop = text.strip().split()[1]  # a word from the middle of the greedy text
    cut = oa.completions.create(
        model="gen-qv-r8", prompt=prompt, max_tokens=GEN_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    by_ids = oa.completions.create(
        model="gen-qv-r8", prompt=tok(prompt)["input_ids"], max_tokens=GEN_TOKENS, temperature=0
    )
    assert by_ids.choices[0].text == text


def test_models_list(
    oa: openai.OpenAI, client: TestClient, uploaded: dict[str, RefAdapter], base_id: str
) -> None:
    models = {m.id: m for m in oa.models.list()}
    stored = client.get("/v1/adapters").json()["adapters"]
    generation = {a["name"] for a in stored if a["task"] == "generate"}
    embedding = {a["name"] for a in stored if a["task"] == "embed"}  # for /v1/embeddings
    assert {n for n, r in uploaded.items() if r.task == "generate"} <= generation
    assert set(models) == {base_id, *generation, *embedding}  # classification adapters are not models
    for name in generation | embedding:
        assert models[name].model_extra is not None and models[name].model_extra["parent"] == base_id
        assert models[name].owned_by == "adapterserve"
    assert oa.models.retrieve("gen-qv-r8").id == "gen-qv-r8"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("cls-4")


def test_errors_raise_the_clients_exception_types(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        oa.chat.completions.create(model="no-such-adapter", messages=CHAT)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    assert not_found.value.type == "invalid_request_error"
    with pytest.raises(openai.ConflictError):  # a classification adapter cannot chat
        oa.chat.completions.create(model="cls-4", messages=CHAT)  # type: ignore[arg-type]
    bad: list[dict[str, object]] = [
        {"temperature": 3.0},
        {"max_tokens": 0},
        {"max_tokens": 100_000},
        {"n": 100},
        {  # a tool whose parameters are no JSON schema (the server renders tools on this base)
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            "tool_choice": "required",
        },
        {"top_logprobs": 3},  # without logprobs: true
        {"extra_body": {"no_such_field": 1}},
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    ]
    for extra in bad:
        kwargs = {"model": "gen-qv-r8", "messages": CHAT, **extra}
        with pytest.raises(openai.BadRequestError) as exc:
            oa.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        assert exc.value.type == "invalid_request_error" and exc.value.message, extra
    with pytest.raises(openai.BadRequestError) as exc:
        oa.completions.create(model="gen-qv-r8", prompt=[10**9])
    assert exc.value.param == "prompt"
    # the server still answers after every refusal
    out = oa.completions.create(model="gen-qv-r8", prompt="Hello", max_tokens=2, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def keyed(base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        store=tmp_path_factory.mktemp("keyed-store"),
        api_keys="key-one, key-two",  # type: ignore[arg-type]
        device="cpu",
        dtype="float32",
        max_new_tokens=8,
    )
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    with TestClient(create_app(settings, base=base)) as c:
        yield c


def test_api_keys(keyed: TestClient) -> None:
    model_id: str = keyed.app.state.model_id  # type: ignore[attr-defined]
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.models.list()
    assert exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=model_id, messages=CHAT)  # type: ignore[arg-type]
    right = openai.OpenAI(
        base_url="http://testserver/v1", api_key="key-two", http_client=keyed, max_retries=0
    )
    assert [m.id for m in right.models.list()] == [model_id]
    out = right.completions.create(model=model_id, prompt="Hello", max_tokens=3, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 3
    # the native routes take the same keys; health and metrics stay open
    body = {"prompt": "Hello", "max_new_tokens": 2}
    assert keyed.post("/generate", json=body).status_code == 401
    assert keyed.post("/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = keyed.post("/generate", json=body, headers={"Authorization": "Bearer key-one"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert keyed.get("/v1/adapters").status_code == 401
    assert keyed.get("/healthz").status_code == 200 and keyed.get("/metrics").status_code == 200


def test_a_closed_stream_over_real_http_frees_its_rows(
    live_url: str, client: TestClient, uploaded: dict[str, RefAdapter]
) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    real = openai.OpenAI(base_url=f"{live_url}/v1", api_key="any", max_retries=0)
    stream = real.chat.completions.create(
        model="gen-qv-r8",
        messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
        max_tokens=60,
        temperature=0,
        n=2,
        stream=True,
    )
    seen = set()
    for chunk in stream:
        seen.update(c.index for c in chunk.choices if c.delta.content)
        if seen == {0, 1}:
            break
    deadline = time.monotonic() + 5  # the rows join the running batch right after their prefill
    while engine.running_generations != 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.running_generations == 2  # both choices decode in the running batch
    stream.close()
    deadline = time.monotonic() + 10  # the client hung up: both rows leave at the next step
    while engine.running_generations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running_generations == 0
    out = real.completions.create(
        model="gen-qv-r8", prompt=GENERATE_PROMPTS[0], max_tokens=GEN_TOKENS, temperature=0
    )
    assert out.choices[0].text == uploaded["gen-qv-r8"].texts[GENERATE_PROMPTS[0]]


# a small multiple-choice set: (context, choices, the index a sensible model prefers is not assumed)
CHOICES = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"]),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"]),
    ("The opposite of hot is", [" cold", " warm", " loud"]),
    ("A week has seven", [" days", " months", " apples"]),
]


def _peft_prompt_logprobs(
    base_path: Path, folder: Path | None, prompts: list[list[int]]
) -> list[list[float]]:
    """log p(token t | tokens before t) for t >= 1 of each prompt, from PeftModel (or the bare base)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_path)
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder)
    model.eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            lps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            out.append([lps[t - 1, ids[t]].item() for t in range(1, len(ids))])
    return out


@pytest.mark.parametrize("adapter", [None, "gen-qv-r8"])
def test_echo_logprobs_score_prompts_as_peft(
    oa: openai.OpenAI,
    uploaded: dict[str, RefAdapter],
    tok: PreTrainedTokenizerBase,
    base_path: Path,
    base_id: str,
    adapter: str | None,
) -> None:
    """lm-evaluation-harness's log-likelihood request (context + continuation as token ids, echo,
    logprobs, max_tokens 0): every prompt token's log-probability equals PEFT's log-softmax, and
    the multiple-choice answers it picks are PEFT's."""
    folder = uploaded[adapter].folder if adapter else None
    prompts, spans = [], []
    for context, choices in CHOICES:
        ctx = tok(context)["input_ids"]
        for choice in choices:
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            prompts.append(ctx + cont)
            spans.append(len(cont))
    outs = [  # a question's choices per request (MAX_CHOICES prompts at most)
        oa.completions.create(
            model=adapter or base_id,
            prompt=prompts[k : k + 3],
            echo=True,
            logprobs=2,
            max_tokens=0,
            temperature=0,
        )
        for k in range(0, len(prompts), 3)
    ]
    want = _peft_prompt_logprobs(base_path, folder, prompts)
    got_scores, want_scores = [], []
    answers = [c for o in outs for c in o.choices]
    for choice, ids, ref, span in zip(answers, prompts, want, spans, strict=True):
        lp = choice.logprobs
        assert lp is not None and choice.text == tok.decode(ids) and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs is not None and lp.top_logprobs[0] is None
        got = [float(v) for v in lp.token_logprobs[1:]]
        assert len(got) == len(ids) - 1 and max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-4
        assert all(
            len(t) == 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], got, strict=True)
        )
        got_scores.append(sum(got[-span:]))
        want_scores.append(sum(ref[-span:]))
    assert all(o.usage is not None and o.usage.completion_tokens == 0 for o in outs)
    picks = [
        max(range(k, k + 3), key=s.__getitem__)
        for s in (got_scores, want_scores)
        for k in range(0, len(prompts), 3)
    ]
    assert picks[: len(CHOICES)] == picks[len(CHOICES) :]
    # with a completion after the echo: the prompt's entries first, then the generated token's
    more = oa.completions.create(
        model=adapter or base_id, prompt=prompts[0], echo=True, logprobs=0, max_tokens=1, temperature=0
    )
    entries = more.choices[0].logprobs
    assert entries is not None and len(entries.tokens) == len(prompts[0]) + 1
    assert entries.text_offset[-1] == len(tok.decode(prompts[0]))


def test_max_tokens_zero_needs_echo(oa: openai.OpenAI, base_id: str) -> None:
    with pytest.raises(openai.BadRequestError, match="echo"):
        oa.completions.create(model=base_id, prompt="Hello", max_tokens=0)
