"""Wire schemas of the OpenAI-compatible routes (the subset of OpenAI's API that adapterserve serves).

Unknown fields are refused (400), as OpenAI does. Fields that change nothing for this server are
accepted and ignored (docs/decoding.md lists them): ``user``, ``metadata``, ``store``, ``service_tier``,
``reasoning_effort`` and ``verbosity`` (the base does not reason), ``modalities: ["text"]``,
``prediction`` (a latency hint: the output is the same without it), ``parallel_tool_calls`` (at most
one call per choice is made), ``prompt_cache_key``, ``safety_identifier``. What cannot be honoured
(audio, images, other modalities, the deprecated ``functions``) is refused with a message naming it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.protocol.decoding import MAX_TOP_LOGPROBS, DecodingOptions, TokenLogprobOut, is_none
from app.protocol.native import MAX_STOP, PRIORITY_FIELD
from app.protocol.strict import StrictModel

MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # image_url, input_audio...: refused below

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, not {self.type!r}")
        return self


class FunctionCall(StrictModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatMessage:
        if self.role == "function":
            raise ValueError("function messages are deprecated: use tools and tool messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        for call in self.tool_calls or []:
            _args(call)
        return self

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (developer = system, parts joined, tool calls with
        their arguments as objects, as Hugging Face templates expect)."""
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text or "" for p in self.content or [])
        )
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "id": c.id, "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _args(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError as exc:
        raise ValueError(f"tool call {call.id}: arguments must be a JSON object's text") from exc


class FunctionDef(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictModel):
    name: str


class ToolChoiceFunction(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format json_schema (and only it) takes a json_schema object")
        return self


class StreamOptions(StrictModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; chunks are never padded


class _Sampling(DecodingOptions):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="an adapter name, or the base model's id for no adapter")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 1")
    n: int = Field(1, ge=1, description="completions per prompt")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="choice i samples with seed + i")
    stop: str | list[str] | None = Field(None, description="stop strings (not included in the text)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = PRIORITY_FIELD
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

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
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # accepted and ignored (module docstring)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text"]] | None = None
    prediction: dict[str, Any] | None = None
    audio: None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.functions or self.function_call:
            raise ValueError("functions and function_call are deprecated: use tools and tool_choice")
        names = {t.function.name for t in self.tools or []}
        if isinstance(self.tool_choice, ToolChoiceFunction) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, ToolChoiceFunction):
            if not names:
                raise ValueError("tool_choice required or a named function needs tools")
            if self.response_format is not None and self.response_format.type != "text":
                raise ValueError("a forced tool call and a JSON response_format exclude each other")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the output may be a tool call (tools given and tool_choice not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> tuple[bool, str | None]:
        """(a call is forced, the forced function's name or None for any)."""
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return True, self.tool_choice.function.name
        return self.tool_choice == "required", None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, token ids, or lists of token ids"
    )
    max_tokens: int | None = Field(
        16, ge=0, description="default 16, as OpenAI's; 0 with echo: only the prompt (scoring it)"
    )
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (not self.prompt or any(p in ("", []) for p in self.prompt)):
            raise ValueError("prompt must not be empty")
        if self.prompt == "":
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is for echo (the prompt's logprobs)")
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
FinishReason = Literal["stop", "length", "timeout", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens taken from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=is_none)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions API's log-probabilities (parallel lists, one entry per token)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for a prompt's first token (echo)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# --- streamed chunks (server-sent events, as OpenAI streams them) ----------------------------------
class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=is_none)
    content: str | None = Field(None, exclude_if=is_none)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class _Chunk(BaseModel):
    id: str
    created: int
    model: str
    object: str
    system_fingerprint: None = None
    usage: Usage | None = None  # only with stream_options.include_usage: null, then the totals

    def payload(self, include_usage: bool) -> dict[str, Any]:
        return self.model_dump(exclude=None if include_usage else {"usage"})


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapterserve"
    parent: str | None = None
    root: str
    quantization: Literal["none", "bf16", "int8", "int4", "w8a8"] | None = Field(
        None, description="the base model's weight quantization (the base's card only)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
