"""Wire schemas of the OpenAI-compatible routes (the subset of OpenAI's API that adapterserve serves).

Unknown fields are refused (400), as OpenAI does; fields that OpenAI defines but this server cannot
honour (tools, logprobs, penalties...) are accepted only at their neutral value, with a message
naming the field otherwise.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.protocol.native import MAX_STOP


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as documented: no "5" or true for 5


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # image_url, input_audio...: refused below

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, not {self.type!r}")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatMessage:
        if self.role in ("tool", "function") or self.tool_calls:
            raise ValueError("tool and function calling are not supported")
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_template_message(self) -> dict[str, str]:
        """The message as the chat template takes it (developer = system, parts joined)."""
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text or "" for p in self.content or [])
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; chunks are never padded


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="an adapter name, or the base model's id for no adapter")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 1")
    n: int = Field(1, ge=1, description="completions per prompt")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="choice i samples with seed + i")
    stop: str | list[str] | None = Field(None, description="stop strings (not included in the text)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported; leave them at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return v

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated name of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: up to the server's cap")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools or self.functions or self.tool_choice not in (None, "none") or self.function_call:
            raise ValueError("tool and function calling are not supported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, token ids, or lists of token ids"
    )
    max_tokens: int | None = Field(16, ge=1, description="default 16, as OpenAI's")
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (not self.prompt or any(p in ("", []) for p in self.prompt)):
            raise ValueError("prompt must not be empty")
        if self.prompt == "":
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [x for x in p if not isinstance(x, int)]


# --- responses --------------------------------------------------------------------------------
# "timeout": cut off by the request deadline (REQUEST_TIMEOUT_S); the text is what was generated until then
FinishReason = Literal["stop", "length", "timeout"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapterserve"
    parent: str | None = None
    root: str
    quantization: Literal["none", "int8", "int4"] | None = Field(
        None, description="the base model's weight quantization (the base's card only)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
