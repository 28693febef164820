"""Wire schemas of the HTTP API (see README for the contract)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 8  # stop strings per request (native and OpenAI routes)
MAX_MEMBERS = 8  # adapters in one classification ensemble


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as documented: no "5" or true for 5


class EnsembleMember(_Strict):
    name: str = Field(description="a classification adapter")
    weight: float = Field(1.0, gt=0, description="its weight in the ensemble")


class ClassifyRequest(_Strict):
    adapter: str | None = Field(None, description="name of a classification adapter")
    adapters: list[str | EnsembleMember] | None = Field(
        None,
        min_length=1,
        max_length=MAX_MEMBERS,
        description="an ensemble instead of `adapter`: names, or {name, weight} objects; every "
        "member runs as its own rows of the same batch",
    )
    combine: Literal["mean", "vote", "logits"] = Field(
        "mean",
        description="ensembles: weighted mean of the probabilities, weighted majority vote (ties to "
        "the higher mean probability), or weighted mean of the logits then softmax",
    )
    return_members: bool = Field(False, description="ensembles: add each member's own result")
    inputs: str | list[str] = Field(description="one text or a list of texts")
    top_k: int | None = Field(None, ge=1, description="return only the k best labels in `scores`")

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("inputs must not be empty")
        texts = [v] if isinstance(v, str) else v
        if any(not t.strip() for t in texts):
            raise ValueError("inputs must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> ClassifyRequest:
        if (self.adapter is None) == (self.adapters is None):
            raise ValueError("give exactly one of `adapter` (a name) or `adapters` (an ensemble)")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("an ensemble names each adapter once (weights say how much it counts)")
        return self

    @property
    def members(self) -> list[EnsembleMember]:
        """The adapters asked for, with their weights (one member of weight 1 for `adapter`)."""
        if self.adapters is None:
            return [EnsembleMember(name=self.adapter or "")]
        return [m if isinstance(m, EnsembleMember) else EnsembleMember(name=m) for m in self.adapters]

    @property
    def target(self) -> str:
        """The adapter, or the ensemble's members joined by '+' (its name in responses and metrics)."""
        return self.adapter if self.adapter is not None else "+".join(m.name for m in self.members)

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class MemberResult(BaseModel):
    adapter: str
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float]
    members: list[MemberResult] | None = Field(
        None, description="each member's own result (ensembles with return_members)"
    )


class ClassifyUsage(BaseModel):
    input_tokens: int


class ClassifyResponse(BaseModel):
    adapter: str = Field(description="the adapter, or an ensemble's members joined by '+'")
    results: list[ClassifyResult]
    usage: ClassifyUsage


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(_Strict):
    adapter: str | None = Field(None, description="generation adapter; null = the bare base model")
    prompt: str | None = Field(None, description="raw prompt (no chat template)")
    messages: list[Message] | None = Field(None, description="chat messages; the chat template is applied")
    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens to generate at most; default min(128, the server's cap)"
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] = Field(default_factory=list, description="stop strings (not included)")
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        if len(self.stop_list) > MAX_STOP or any(not s for s in self.stop_list):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    adapter: str | None
    text: str
    finish_reason: Literal["stop", "length", "timeout"] = Field(
        description="stop: EOS or a stop string; length: max_new_tokens; timeout: cut off by the request "
        "deadline (REQUEST_TIMEOUT_S), the text is what was generated until then"
    )
    usage: GenerateUsage


class AdapterOut(BaseModel):
    name: str
    task: Literal["classify", "generate"]
    kind: str
    rank: int
    alpha: float
    target_modules: list[str]
    labels: list[str] | None
    num_params: int
    size_bytes: int
    sha256: str
    version: int
    created_at: float
    tier: Literal["store", "host", "device"]
    pinned: bool
    last_used: float | None
    request_count: int


class AdapterList(BaseModel):
    adapters: list[AdapterOut]
