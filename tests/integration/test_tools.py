"""Tool calling through the official ``openai`` client on a base whose chat template renders tools
(a tiny random Qwen2 with a Hermes-style template): a named tool choice and ``required`` return a
valid call of the tools' schemas (constrained decoding), streamed as one tool-call delta; tool
results go back through the template; ``auto`` parses ``<tool_call>`` blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from app.config import Settings
from app.main import create_app
from tests.helpers.families import tiny_base

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n{% for tool in tools %}"
    '{{ tool | tojson }}\n{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}'
    "</tool_call>.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>"
    "{{ call.function | tojson }}</tool_call>{% endfor %}{% else %}{{ message.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
REFUND = {
    "type": "function",
    "function": {
        "name": "open_refund",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, REFUND)}  # type: ignore[index]


@pytest.fixture(scope="module")
def tool_base(base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tiny_base("qwen2", base_path, tmp_path_factory.mktemp("tiny-tools"))
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def tools_client(
    tool_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[openai.OpenAI, str]]:
    settings = Settings(
        base_model=str(tool_base),
        store=tmp_path_factory.mktemp("tiny-tools-store"),
        device="cpu",
        dtype="float32",
        max_new_tokens=96,
    )
    with TestClient(create_app(settings)) as client:
        oa = openai.OpenAI(base_url="http://testserver/v1", api_key="any", http_client=client, max_retries=0)
        yield oa, str(client.app.state.model_id)  # type: ignore[attr-defined]


def _check_call(call: Any, name: str | None = None) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    args: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_named_tool_choice_returns_a_valid_call(tools_client: tuple[openai.OpenAI, str]) -> None:
    oa, model = tools_client
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo for three days?"}]
    for choice in (
        {"type": "function", "function": {"name": "get_weather"}},
        {"type": "function", "function": {"name": "open_refund"}},
        "required",
    ):
        out = oa.chat.completions.create(
            model=model,
            messages=messages,
            tools=[WEATHER, REFUND],
            tool_choice=choice,
            max_tokens=96,
            temperature=0,  # type: ignore[arg-type, list-item]
        )
        (c,) = out.choices
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls or []
        _check_call(call, choice["function"]["name"] if isinstance(choice, dict) else None)  # type: ignore[index]
    # streamed: one delta with the whole call, then the finish chunk
    stream = oa.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER, REFUND],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=96,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    streamed = calls[0]
    assert streamed.function is not None and streamed.function.name == "get_weather"
    jsonschema.validate(json.loads(streamed.function.arguments or ""), SCHEMAS["get_weather"])


def test_tool_results_go_through_the_template(tools_client: tuple[openai.OpenAI, str]) -> None:
    """A conversation with the assistant's call and the tool's answer is rendered and answered."""
    oa, model = tools_client
    args = json.dumps({"city": "Oslo", "days": 3, "unit": "celsius"})
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 12 degrees."},
    ]
    out = oa.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=5,
        temperature=0,  # type: ignore[list-item]
    )
    assert out.choices[0].message.tool_calls is None and out.usage is not None
    # the prompt carries the call and the tool's answer (more prompt tokens than without them)
    short = oa.chat.completions.create(
        model=model, messages=messages[:1], tools=[WEATHER], max_tokens=1, tool_choice="none"
    )  # type: ignore[list-item]
    assert short.usage is not None and out.usage.prompt_tokens > short.usage.prompt_tokens + 20
    with pytest.raises(openai.BadRequestError, match="arguments"):
        bad = [
            *messages[:1],
            {
                **messages[1],
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}
                ],
            },
        ]
        oa.chat.completions.create(model=model, messages=bad, max_tokens=2)
