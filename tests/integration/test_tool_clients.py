"""Tools on a base whose chat template cannot render them (the default SmolLM2): the server renders
them itself (app/serving/tool_prompt.py) and its grammar constrains the call. The client libraries
people point at OpenAI-compatible servers each get a parsed call or object: instructor (TOOLS mode),
langchain (``bind_tools``, ``with_structured_output(method="function_calling")``), openai-agents
(a function tool) and pydantic-ai (its default structured output, a tool call)."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

QUESTION = "What is the weather in Paris? Answer in celsius."


class Weather(BaseModel):
    """The weather in a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


def _paris(city: str) -> bool:
    return "paris" in city.lower()


def test_the_prompt_carries_the_tools_and_the_calls(client: TestClient, base_id: str) -> None:
    """A conversation with an earlier call and its result renders (a 200 with a valid answer), and
    ``auto`` answers either a call of the tools or plain text."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
    ]
    body = {"model": base_id, "messages": messages, "tools": tools, "temperature": 0, "max_tokens": 40}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and "city" in json.loads(
            call["function"]["arguments"]
        )
    else:
        assert choice["message"]["content"] and not choice["message"]["content"].startswith("{")
    forced = client.post("/v1/chat/completions", json=body | {"tool_choice": "required", "stream": True})
    assert (
        forced.status_code == 200
        and '"tool_calls"' in forced.text
        and '"finish_reason": "tool_calls"' in forced.text
    )


def test_instructor_tools_mode(client: TestClient, base_id: str) -> None:
    import instructor

    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="any", http_client=client, max_retries=0)
    structured = instructor.from_openai(oa, mode=instructor.Mode.TOOLS)
    weather = structured.chat.completions.create(
        model=base_id,
        response_model=Weather,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    assert isinstance(weather, Weather) and _paris(weather.city)


def test_langchain_bind_tools_and_structured_output(client: TestClient, base_id: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"18 C in {city}"

    llm = ChatOpenAI(
        model=base_id,
        base_url="http://testserver/v1",
        api_key="any",  # type: ignore[arg-type]
        http_client=client,
        temperature=0,
        max_retries=0,
        max_completion_tokens=60,
    )
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION)
    (call,) = message.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather" and _paris(call["args"]["city"])
    weather = llm.with_structured_output(Weather, method="function_calling").invoke(QUESTION)
    assert isinstance(weather, Weather) and _paris(weather.city)


def test_openai_agents_function_tool(live_url: str, base_id: str) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"18 C and sunny in {city}"

    model = OpenAIChatCompletionsModel(
        model=base_id,
        openai_client=openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="any", max_retries=0),
    )
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
        tool_use_behavior="stop_on_first_tool",  # the tool's answer is the agent's
    )
    result = Runner.run_sync(agent, QUESTION)
    assert len(asked) == 1 and _paris(asked[0])
    assert result.final_output == f"18 C and sunny in {asked[0]}"


def test_pydantic_ai_structured_output(live_url: str, base_id: str) -> None:
    from pydantic_ai import Agent, ModelSettings
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(base_id, provider=OpenAIProvider(base_url=f"{live_url}/v1", api_key="any"))
    agent = Agent(model, output_type=Weather, model_settings=ModelSettings(temperature=0, max_tokens=60))
    result = agent.run_sync(QUESTION)
    assert isinstance(result.output, Weather) and _paris(result.output.city)


@pytest.mark.parametrize("choice", ["none"])
def test_tool_choice_none_is_plain_chat(client: TestClient, base_id: str, choice: str) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {
        "model": base_id,
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": tools,
        "tool_choice": choice,
    }
    plain = {"model": base_id, "messages": [{"role": "user", "content": "Hi"}]}
    a = client.post("/v1/chat/completions", json=body | {"temperature": 0, "max_tokens": 12}).json()
    b = client.post("/v1/chat/completions", json=plain | {"temperature": 0, "max_tokens": 12}).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
