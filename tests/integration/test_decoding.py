"""Decoding options through the official ``openai`` client on the default base, against PEFT run
in-process: log-probabilities equal log_softmax of PEFT's logits (adapter and base rows sharing
batches), penalties / logit_bias / min_tokens equal a step-by-step reference, JSON-schema output
validates for 20 prompts × 3 adapters in one mixed batch while unconstrained rows keep PEFT's text,
and each of these streamed equals the same not streamed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerBase

from tests.helpers.peft_ref import GEN_TOKENS, GENERATE_PROMPTS, RefAdapter

ADAPTERS = ("gen-qv-r8", "gen-pattern", "gen-all-rslora")
TICKET = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["refund", "delivery", "technical", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "amount": {"type": "number", "minimum": 0, "maximum": 1000},
        "items": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 4},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["intent", "urgency", "amount", "items"],
    "additionalProperties": False,
}
COMPLAINTS = [
    "My order never arrived and I want my money back.",
    "The kettle I bought is broken, please refund 40 dollars.",
    "Where is my parcel? It is three days late.",
    "The app crashes every time I open settings.",
    "I was charged twice for two mugs.",
    "Can you change the delivery address of my order?",
    "My laptop does not turn on after the update.",
    "I would like to return three shirts, size M.",
    "The courier left the box in the rain.",
    "Password reset emails never reach me.",
    "I received the wrong colour of sofa.",
    "Please cancel my subscription today.",
    "The printer shows error 42 and stops.",
    "Two of the four plates arrived cracked.",
    "How long does express shipping take?",
    "The discount code SAVE10 was not applied.",
    "My headphones only play on the left side.",
    "I need an invoice for order 5531.",
    "The tracking page has not updated for a week.",
    "The blender is too loud, can I swap it?",
]


@pytest.fixture(scope="module")
def oa(live_url: str, uploaded: dict[str, RefAdapter]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="any", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def ref_model(base_path: Path, uploaded: dict[str, RefAdapter]) -> Iterator[Any]:
    """PEFT (or the bare base for None), one model per adapter, loaded once."""

    @cache
    def get(name: str | None) -> Any:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, uploaded[name].folder)
        return model.eval()

    yield get
    get.cache_clear()


def _log_softmax(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's next-token logits after every prefix of ``ids`` [len, vocab]."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def _chat_ids(tok: PreTrainedTokenizerBase, content: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = tok(str(text), add_special_tokens=False)["input_ids"]
    return ids


def _ids_of(tok: PreTrainedTokenizerBase, entries: list[Any]) -> list[int]:
    """Token ids of logprob entries (each token's bytes name exactly one vocabulary entry)."""
    by_bytes = _bytes_table(tok)
    return [by_bytes[bytes(e.bytes)] for e in entries]


@cache
def _bytes_table_cached(name: str, tok: PreTrainedTokenizerBase) -> dict[bytes, int]:
    table: dict[bytes, int] = {}
    for i in range(len(tok)):
        raw = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]).encode("utf-8", "surrogatepass")
        table.setdefault(raw, i)
    return table


def _bytes_table(tok: PreTrainedTokenizerBase) -> dict[bytes, int]:
    return _bytes_table_cached(tok.name_or_path, tok)


def test_chat_logprobs_equal_log_softmax(
    oa: openai.OpenAI, ref_model: Any, tok: PreTrainedTokenizerBase, base_id: str
) -> None:
    """Base and adapter rows, concurrently (shared batches): every token's log-probability and its
    top 5 equal PEFT's log_softmax (≤ 1e-4), ordered, the greedy token first; streamed = not."""
    question = "Name a colour of the sky."
    models = [base_id, *ADAPTERS]

    def ask(model: str, stream: bool = False) -> Any:
        kw: dict[str, Any] = dict(model=model, messages=[{"role": "user", "content": question}])
        kw.update(logprobs=True, top_logprobs=5, max_tokens=8, temperature=0)
        if not stream:
            return oa.chat.completions.create(**kw).choices[0]
        entries, text = [], ""
        for chunk in oa.chat.completions.create(stream=True, **kw):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                entries += chunk.choices[0].logprobs.content
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return text, entries

    with ThreadPoolExecutor(len(models) * 2) as pool:
        plain = list(pool.map(ask, models))
        streamed = list(pool.map(lambda m: ask(m, True), models))
    prompt = _chat_ids(tok, question)
    for model, choice, (s_text, s_entries) in zip(models, plain, streamed, strict=True):
        entries = choice.logprobs.content
        assert entries and len(entries) == len(s_entries)
        assert s_text == choice.message.content
        ids = _ids_of(tok, entries)
        ref = _log_softmax(ref_model(None if model == base_id else model), prompt + ids)
        for k, (e, s, tid) in enumerate(zip(entries, s_entries, ids, strict=True)):
            row = ref[len(prompt) - 1 + k]
            assert abs(e.logprob - row[tid].item()) <= 1e-4
            values, top_ids = row.topk(5)
            assert [t.logprob for t in e.top_logprobs] == sorted(
                (t.logprob for t in e.top_logprobs), reverse=True
            )
            assert torch.allclose(
                torch.tensor([t.logprob for t in e.top_logprobs]).double(), values, atol=1e-4
            )
            assert _ids_of(tok, e.top_logprobs[:1])[0] == tid == int(top_ids[0])  # greedy: the most likely
            assert e.top_logprobs[0].logprob == e.logprob and e.token == e.top_logprobs[0].token
            assert (s.token, s.bytes) == (e.token, e.bytes) and abs(s.logprob - e.logprob) < 1e-4


def test_logprobs_match_the_returned_tokens_when_the_end_token_stops(oa: openai.OpenAI, base_id: str) -> None:
    """A choice ended by the end-of-sequence token: one entry per returned token (the end token is
    not one, as OpenAI's), plain and streamed."""
    kw: dict[str, Any] = dict(model=base_id, messages=[{"role": "user", "content": "Say hi"}])
    kw.update(logprobs=True, max_tokens=60, temperature=0)
    out = oa.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and out.usage is not None
    entries = choice.logprobs.content
    assert len(entries) == out.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    streamed = [
        e
        for chunk in oa.chat.completions.create(stream=True, **kw)
        if chunk.choices and chunk.choices[0].logprobs is not None
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_completion_logprobs_legacy_format(
    oa: openai.OpenAI, ref_model: Any, tok: PreTrainedTokenizerBase, uploaded: dict[str, RefAdapter]
) -> None:
    prompt = GENERATE_PROMPTS[0]
    ref = uploaded["gen-qv-r8"]
    out = oa.completions.create(
        model=ref.name, prompt=prompt, max_tokens=GEN_TOKENS, temperature=0, logprobs=3, echo=True
    )
    (choice,) = out.choices
    lp = choice.logprobs
    assert lp is not None and choice.text == prompt + ref.texts[prompt]
    prompt_ids = tok(prompt)["input_ids"]
    n = len(prompt_ids)  # echo: the prompt's tokens come first (the first without a log-probability)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    ids = ref.token_ids[prompt][: len(lp.tokens) - n]
    assert "".join(lp.tokens[n:]) == ref.texts[prompt] or tok.decode(ids) == ref.texts[prompt]
    assert lp.text_offset[n] == len(prompt)
    table = _log_softmax(ref_model(ref.name), prompt_ids + ids)
    for k, tid in enumerate(prompt_ids[1:] + ids, start=1):
        assert abs(lp.token_logprobs[k] - table[k - 1, tid].item()) <= 1e-4
        top = lp.top_logprobs[k]
        assert top is not None and len(top) == 3
        if k >= n:  # greedy: the chosen token is the most likely
            assert max(top.values()) == lp.token_logprobs[k]
        else:  # a prompt token: the most likely is at least as likely
            assert max(top.values()) >= lp.token_logprobs[k] - 1e-6


def _reference_penalized(model: Any, prompt: list[int], steps: int, eos: int, o: dict[str, Any]) -> list[int]:
    """Greedy decoding with logit_bias, min_tokens, frequency/presence and repetition penalties
    applied to the full logits at every step, written out plainly."""
    ids, out = list(prompt), []
    step_input, cache = torch.tensor([ids]), DynamicCache()  # a KV cache, as generate() keeps one
    for _ in range(steps):
        with torch.no_grad():
            logits = model(step_input, cache=cache, use_cache=True).logits[0, -1].double().clone()
        for t, b in o["logit_bias"].items():
            logits[int(t)] += b
        if len(out) < o["min_tokens"]:
            logits[eos] = float("-inf")
        for t, c in Counter(out).items():
            logits[t] -= o["frequency_penalty"] * c + o["presence_penalty"]
        for t in set(ids):
            v = logits[t]
            logits[t] = v / o["repetition_penalty"] if v > 0 else v * o["repetition_penalty"]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        step_input = torch.tensor([[nxt]])
        if nxt == eos:
            break
    return out


def test_penalties_and_bias_equal_reference(
    oa: openai.OpenAI, ref_model: Any, tok: PreTrainedTokenizerBase, base_id: str
) -> None:
    """Each row with its own penalties and bias, all in one batch (and one row with none)."""
    question = "List three fruits, then three fruits again."
    bias_token = tok(" banana", add_special_tokens=False)["input_ids"][0]
    cases: list[tuple[str, dict[str, Any]]] = [
        (
            base_id,
            dict(
                frequency_penalty=1.2,
                presence_penalty=0.0,
                repetition_penalty=1.0,
                logit_bias={},
                min_tokens=0,
            ),
        ),
        (
            "gen-qv-r8",
            dict(
                frequency_penalty=0.0,
                presence_penalty=1.5,
                repetition_penalty=1.0,
                logit_bias={},
                min_tokens=0,
            ),
        ),
        (
            "gen-pattern",
            dict(
                frequency_penalty=0.3,
                presence_penalty=0.2,
                repetition_penalty=1.3,
                logit_bias={},
                min_tokens=0,
            ),
        ),
        (
            base_id,
            dict(
                frequency_penalty=0.0,
                presence_penalty=0.0,
                repetition_penalty=1.0,
                logit_bias={str(bias_token): 8.0},
                min_tokens=12,
            ),
        ),
        (
            "gen-all-rslora",
            dict(
                frequency_penalty=0.0,
                presence_penalty=0.0,
                repetition_penalty=1.0,
                logit_bias={},
                min_tokens=0,
            ),
        ),
    ]

    def run(case: tuple[str, dict[str, Any]], stream: bool = False) -> str:
        model, o = case
        out = oa.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
            frequency_penalty=o["frequency_penalty"],
            presence_penalty=o["presence_penalty"],
            logit_bias={k: int(v) for k, v in o["logit_bias"].items()},
            extra_body={"repetition_penalty": o["repetition_penalty"], "min_tokens": o["min_tokens"]},
            stream=stream,
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
        return out.choices[0].message.content or ""

    with ThreadPoolExecutor(len(cases) + 2) as pool:
        streamed = [pool.submit(run, cases[i], True) for i in (2, 3)]
        texts = list(pool.map(run, cases))
        assert [f.result() for f in streamed] == [texts[2], texts[3]]  # streamed = not streamed
    prompt = _chat_ids(tok, question)
    eos = tok.eos_token_id
    plain = _reference_penalized(ref_model(None), prompt, 16, eos, cases[-1][1] | {"min_tokens": 0})
    for (model, o), text in zip(cases, texts, strict=True):
        ref = _reference_penalized(ref_model(None if model == base_id else model), prompt, 16, eos, o)
        assert text == tok.decode([t for t in ref if t != eos]), (model, o)
    assert str(bias_token) in cases[3][1]["logit_bias"] and texts[3] != tok.decode(plain)  # the bias acts


def test_json_schema_in_mixed_batch(oa: openai.OpenAI, uploaded: dict[str, RefAdapter], base_id: str) -> None:
    """20 complaints × 3 adapters under the ticket schema and unconstrained rows, all at once: every
    constrained output parses and validates; the unconstrained rows keep PEFT's greedy text."""
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET, "strict": True}}

    def constrained(job: tuple[str, str]) -> tuple[str, str | None]:
        model, text = job
        out = oa.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": "Reply with the support ticket as JSON."},
                {"role": "user", "content": text},
            ],
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=64,
            temperature=0,
        )
        return out.choices[0].finish_reason, out.choices[0].message.content

    def free(job: tuple[str, str]) -> str:
        model, prompt = job
        return (
            oa.completions.create(model=model, prompt=prompt, max_tokens=GEN_TOKENS, temperature=0)
            .choices[0]
            .text
        )

    jobs = [(ADAPTERS[i % 3], text) for i, text in enumerate(COMPLAINTS)] + [
        (a, COMPLAINTS[0]) for a in ADAPTERS
    ]
    plain = [(name, p) for name in ("gen-qv-r8", "gen-pattern") for p in GENERATE_PROMPTS]
    with ThreadPoolExecutor(len(jobs) + len(plain)) as pool:
        free_out = pool.map(free, plain)
        outs = list(pool.map(constrained, jobs))
        texts = list(free_out)
    for (model, _), (finish, content) in zip(jobs, outs, strict=True):
        assert finish == "stop" and content is not None, (model, content)
        jsonschema.validate(json.loads(content), TICKET)
    assert len({c for _, c in outs}) > 3  # the adapters and prompts give different tickets
    for (name, prompt), text in zip(plain, texts, strict=True):
        assert text == uploaded[name].texts[prompt]
    # streamed: the same document in pieces
    stream = oa.chat.completions.create(
        model=ADAPTERS[0],
        messages=[
            {"role": "system", "content": "Reply with the support ticket as JSON."},
            {"role": "user", "content": COMPLAINTS[0]},
        ],
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == outs[-3][1] and len([p for p in pieces if p]) > 3


def test_json_object_and_regex(oa: openai.OpenAI, client: TestClient, base_id: str) -> None:
    out = oa.chat.completions.create(
        model=base_id,
        messages=[{"role": "user", "content": "Describe Paris as JSON with a name and a country."}],
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    resp = client.post(
        "/generate", json={"prompt": "Call me on", "regex": r" \d{3}-\d{4}", "max_new_tokens": 20}
    )
    body = resp.json()
    assert resp.status_code == 200 and body["finish_reason"] == "stop"
    import re

    assert re.fullmatch(r" \d{3}-\d{4}", body["text"])


def test_bad_decoding_options_are_400(oa: openai.OpenAI, base_id: str, client: TestClient) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    bad: list[tuple[dict[str, Any], str]] = [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"extra_body": {"min_tokens": 500}, "max_tokens": 10}, "min_tokens"),
        (  # a tool whose parameters are no JSON schema (the server renders tools on this base)
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            },
            "tool_choice",
        ),
        ({"modalities": ["audio"]}, "modalities"),
    ]
    for kwargs, field in bad:
        with pytest.raises(openai.BadRequestError) as err:
            oa.chat.completions.create(
                model=base_id, messages=msgs, max_tokens=kwargs.pop("max_tokens", 4), **kwargs
            )  # type: ignore[call-overload]
        assert field in str(err.value), (field, str(err.value))
    # neutral values and fields that change nothing are accepted
    out = oa.chat.completions.create(
        model=base_id,
        messages=msgs,
        max_tokens=3,
        temperature=0,
        presence_penalty=0,
        frequency_penalty=0,
        logprobs=False,
        tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        parallel_tool_calls=False,
        reasoning_effort="low",
        modalities=["text"],
        user="u-1",
        metadata={"k": "v"},
        store=False,
        extra_body={"prediction": None},
    )
    plain = oa.chat.completions.create(model=base_id, messages=msgs, max_tokens=3, temperature=0)
    assert out.choices[0].message.content == plain.choices[0].message.content
