"""Logits processing and log-probabilities (app/engine/logits.py) against plain per-row loops, tool
call parsing, and the decoding fields' validation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from app.engine.logits import RowState, logprobs_of, process
from app.engine.types import SamplingParams
from app.protocol.decoding import DecodingOptions
from app.protocol.openai import ChatCompletionRequest
from app.serving.decoding import token_text
from app.serving.tools import parse_tool_calls, tool_call_schema

VOCAB = 50
EOS = 7


def _reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]) -> torch.Tensor:
    x = logits.double().clone()
    for t, b in p.logit_bias:
        x[t] += b
    if len(out) < p.min_tokens:
        x[EOS] = float("-inf")
    for t, c in Counter(out).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    if p.repetition_penalty != 1.0:
        for t in set(prompt + out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    return x


def test_process_equals_per_row_reference() -> None:
    torch.manual_seed(0)
    params = [
        SamplingParams(8),  # asks for nothing
        SamplingParams(8, presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(8, repetition_penalty=1.5),
        SamplingParams(8, logit_bias=((3, 5.0), (9, -100.0)), min_tokens=3),
        SamplingParams(8, presence_penalty=-0.5, repetition_penalty=0.8, min_tokens=1),
    ]
    prompts = [[1, 2, 3], [4, 4, 5], [6, 7, 8, 3], [1], [2, 9]]
    states = [RowState.of(p, pr, VOCAB, torch.device("cpu")) for p, pr in zip(params, prompts, strict=True)]
    assert states[0] is None and all(s is not None for s in states[1:])
    outs: list[list[int]] = [[] for _ in params]
    for _ in range(5):
        logits = torch.randn(len(params), VOCAB) * 3
        got = process(logits, states, [EOS])
        for i, p in enumerate(params):
            want = _reference(logits[i], p, prompts[i], outs[i])
            assert torch.allclose(got[i].double(), want, atol=1e-5), i
        for i, s in enumerate(states):
            tok = int(torch.randint(0, VOCAB, ()).item())
            outs[i].append(tok)
            if s is not None:
                assert s.advance(tok)


def test_every_row_processed_leaves_the_logits_as_they_were() -> None:
    """When every row asks for processing the result is computed in place of a copy: the raw
    logits (which log-probabilities are reported from) must stay as they were."""
    torch.manual_seed(2)
    params = [SamplingParams(8, min_tokens=2), SamplingParams(8, repetition_penalty=1.3)]
    states = [RowState.of(p, [1, 2], VOCAB, torch.device("cpu")) for p in params]
    logits = torch.randn(2, VOCAB) * 3
    raw = logits.clone()
    got = process(logits, states, [EOS])
    assert torch.equal(logits, raw) and got is not logits
    for i, p in enumerate(params):
        assert torch.allclose(got[i].double(), _reference(raw[i], p, [1, 2], []), atol=1e-5)
    half = process(raw.bfloat16(), states, [EOS])  # a bf16 head's logits: processed in float
    assert half.dtype == torch.float32 and half[0, EOS] == float("-inf")


def test_rows_without_options_cost_nothing() -> None:
    logits = torch.randn(3, VOCAB)
    assert process(logits, [None, None, None], [EOS]) is logits


def test_logprobs_of_matches_log_softmax_and_topk() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    chosen = [int(t) for t in logits.argmax(-1)]
    out = logprobs_of(logits, chosen, [None, 0, 3, 5])
    lsm = torch.log_softmax(logits, -1)
    assert out[0] is None
    for i in (1, 2, 3):
        lp = out[i]
        assert lp is not None and lp.token == chosen[i]
        assert abs(lp.logprob - lsm[i, chosen[i]].item()) < 1e-6
        k = [None, 0, 3, 5][i] or 0
        values, ids = lsm[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), values)


def test_parse_tool_calls() -> None:
    names = {"get_weather", "open_refund"}
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', names) == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    text = 'Sure.<tool_call>{"name": "open_refund", "arguments": {"order_id": "AB1234"}}</tool_call>'
    text += '<tool_call>{"name": "get_weather", "parameters": {"city": "Lima"}}</tool_call>'
    calls = parse_tool_calls(text, names)
    assert calls is not None and [n for n, _ in calls] == ["open_refund", "get_weather"]
    assert json.loads(calls[1][1]) == {"city": "Lima"}
    assert parse_tool_calls("It is sunny.", names) is None
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', names) is None
    assert parse_tool_calls("<tool_call>{broken</tool_call>", names) is None


def test_tool_call_schema() -> None:
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "b"}},
    ]
    one = tool_call_schema(tools, "b")
    assert one["properties"]["name"] == {"const": "b"} and one["properties"]["arguments"] == {
        "type": "object"
    }
    assert len(tool_call_schema(tools, None)["anyOf"]) == 2


def test_decoding_fields_validation() -> None:
    with pytest.raises(ValidationError, match="token ids"):
        DecodingOptions(logit_bias={"abc": 1.0})
    with pytest.raises(ValidationError, match=r"\[-100, 100\]"):
        DecodingOptions(logit_bias={"5": 101.0})
    with pytest.raises(ValidationError):
        DecodingOptions(presence_penalty=2.5)
    assert DecodingOptions(logit_bias={"5": 1.0, "6": 0.0}).bias_pairs == ((5, 1.0),)
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest.model_validate({**base, "top_logprobs": 2})
    with pytest.raises(ValidationError, match="not in tools"):
        ChatCompletionRequest.model_validate(
            {**base, "tool_choice": {"type": "function", "function": {"name": "f"}}}
        )
    with pytest.raises(ValidationError, match="deprecated"):
        ChatCompletionRequest.model_validate({**base, "functions": [{"name": "f"}]})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**base, "modalities": ["audio"]})
    ok = ChatCompletionRequest.model_validate(
        {
            **base,
            "reasoning_effort": "low",
            "modalities": ["text"],
            "prediction": None,
            "parallel_tool_calls": True,
        }
    )
    assert not ok.calls_tools


def test_token_text_escapes_partial_characters() -> None:
    assert token_text(" caf\xc3\xa9".encode("latin-1")) == " café"
    assert token_text(b"\xe2\x80") == "\\xe2\\x80"


def test_a_row_with_nothing_allowed_ends_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_tokens refusing EOS where the grammar allows only EOS: EOS stays possible."""
    import app.engine.logits as logits_module

    def only_eos(logits: torch.Tensor, matchers: list[object]) -> torch.Tensor:
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[:, EOS] = True
        return logits.masked_fill(~allowed, float("-inf"))

    monkeypatch.setattr(logits_module, "_masked", only_eos)
    state = RowState(SamplingParams(4, min_tokens=2, grammar="g"), matcher=object())
    out = process(torch.randn(2, VOCAB), [None, state], [EOS])
    assert int(out[1].argmax()) == EOS and torch.isfinite(out[0]).all()
