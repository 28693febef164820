"""Wire schemas of the HTTP API (see README for the contract)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from app.adapters.methods import CombineMethod, GenerateMethod, MergeMethod, Method
from app.adapters.tasks import Task
from app.protocol.decoding import MAX_TOP_LOGPROBS, DecodingOptions, TokenLogprobOut, is_none
from app.protocol.strict import StrictModel

MAX_STOP = 8  # stop strings per request (native and OpenAI routes)
MAX_MEMBERS = 8  # adapters in one composition


class EnsembleMember(StrictModel):
    name: str = Field(description="an adapter")
    weight: float = Field(
        1.0, description="its weight: positive; merges (cat, linear, ties) also take negative weights"
    )

    @field_validator("weight")
    @classmethod
    def _usable(cls, v: float) -> float:
        if not math.isfinite(v) or v == 0:
            raise ValueError("a member's weight must be a finite non-zero number")
        return v


Members = list[str | EnsembleMember]
_MEMBERS_FIELD = Field(
    None,
    min_length=1,
    max_length=MAX_MEMBERS,
    description="a composition instead of `adapter`: names, or {name, weight} objects",
)
_DENSITY_FIELD = Field(1.0, gt=0, le=1, description="ties: the share of each member's values kept")
MAX_PRIORITY = 1_000_000
PRIORITY_FIELD = Field(
    0,
    ge=-MAX_PRIORITY,
    le=MAX_PRIORITY,
    description="order among the requests of the same tenant and adapter: lower runs first (as vLLM's)",
)


def member_list(adapters: Members | None, single: str | None) -> list[EnsembleMember]:
    """The members asked for (one member of weight 1 for a single ``single`` adapter)."""
    if adapters is None:
        return [EnsembleMember(name=single or "")]
    return [m if isinstance(m, EnsembleMember) else EnsembleMember(name=m) for m in adapters]


def check_members(members: list[EnsembleMember], method: str) -> None:
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError("a composition names each adapter once (weights say how much it counts)")
    if method not in ("cat", "linear", "ties") and any(m.weight < 0 for m in members):
        raise ValueError(f"{method}: members' weights must be positive (only merges take negative ones)")


class ExplainOptions(StrictModel):
    method: Literal["integrated_gradients", "gradient_x_input"] = Field(
        "integrated_gradients",
        description="integrated gradients over the input embeddings (a pad-token baseline, "
        "Gauss-Legendre points), or gradient × input (one backward pass)",
    )
    steps: int = Field(
        64, ge=1, le=512, description="integrated gradients: points on the path (docs/explain.md#convergence)"
    )
    target: str | None = Field(None, description="the label to explain; null = each input's predicted label")


class TokenAttribution(BaseModel):
    token: str
    start: int = Field(description="character offset of the token in the input (special tokens: 0)")
    end: int
    score: float
    special: bool = Field(description="a special or template token, not from the text")


class ClassifyRequest(StrictModel):
    adapter: str | None = Field(None, description="name of a classification adapter")
    adapters: Members | None = _MEMBERS_FIELD
    combine: CombineMethod = Field(
        "mean",
        description="ensembles: weighted mean of the probabilities, weighted majority vote (ties to "
        "the higher mean probability), or weighted mean of the logits then softmax; every member "
        "runs as its own rows of the same batch",
    )
    merge: MergeMethod | None = Field(
        None,
        description="instead of an ensemble, one adapter merged from the members' LoRA weights (PEFT's "
        "add_weighted_adapter: cat = the exact weighted sum of the deltas, linear, ties)",
    )
    density: float = _DENSITY_FIELD
    return_members: bool = Field(False, description="ensembles: add each member's own result")
    inputs: str | list[str] = Field(description="one text or a list of texts")
    top_k: int | None = Field(None, ge=1, description="return only the k best labels in `scores`")
    priority: int = PRIORITY_FIELD
    explain: ExplainOptions | None = Field(
        None, description="token attributions of each input's target label (docs/explain.md)"
    )

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
            raise ValueError("give exactly one of `adapter` (a name) or `adapters` (a composition)")
        if self.merge is not None and ("combine" in self.model_fields_set or self.return_members):
            raise ValueError(
                "`merge` serves one merged adapter: `combine` and `return_members` are for ensembles"
            )
        if self.adapters is None and (self.merge is not None or "combine" in self.model_fields_set):
            raise ValueError("`combine` and `merge` apply to `adapters` (a composition)")
        check_members(self.members, self.method)
        return self

    @property
    def method(self) -> Method:
        return self.merge or self.combine

    @property
    def members(self) -> list[EnsembleMember]:
        """The adapters asked for, with their weights (one member of weight 1 for `adapter`)."""
        return member_list(self.adapters, self.adapter)

    @property
    def target(self) -> str:
        """The adapter, or the composition's members joined by '+' (its name in responses)."""
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
    explained: str | None = Field(None, exclude_if=is_none, description="the label the attributions explain")
    attributions: list[TokenAttribution] | None = Field(None, exclude_if=is_none)
    delta: float | None = Field(
        None,
        exclude_if=is_none,
        description="integrated gradients: Σ scores − (logit(input) − logit(baseline)), Captum's "
        "convergence delta",
    )


class ClassifyUsage(BaseModel):
    input_tokens: int


class ClassifyResponse(BaseModel):
    adapter: str = Field(description="the adapter or named composition, or the members joined by '+'")
    results: list[ClassifyResult]
    usage: ClassifyUsage


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(DecodingOptions):
    adapter: str | None = Field(
        None, description="generation adapter or named composition; null = the bare base model"
    )
    adapters: Members | None = _MEMBERS_FIELD
    merge: GenerateMethod = Field(
        "average",
        description="with `adapters`: average = ensemble generation (every member runs as its own "
        "rows; each token is sampled from the weighted mean of their next-token distributions), or "
        "one adapter merged from the members' LoRA weights (cat, linear, ties)",
    )
    density: float = _DENSITY_FIELD
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
    priority: int = PRIORITY_FIELD
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="return each token's log-probability and this many most likely alternatives",
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="structured output: the text is a JSON document valid against this schema"
    )
    regex: str | None = Field(None, description="structured output: the text matches this regular expression")

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
        if self.adapter is not None and self.adapters is not None:
            raise ValueError("give at most one of `adapter` (a name) or `adapters` (a composition)")
        if self.adapters is None and "merge" in self.model_fields_set:
            raise ValueError("`merge` applies to `adapters` (a composition)")
        if self.adapters is not None:
            check_members(member_list(self.adapters, None), self.merge)
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("give at most one of json_schema or regex")
        return self

    @property
    def target(self) -> str | None:
        """The adapter, the composition's members joined by '+', or None (the bare base)."""
        if self.adapters is None:
            return self.adapter
        return "+".join(m.name for m in member_list(self.adapters, None))

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description="of the prompt tokens, those taken from the prefix cache")


class GenerateResponse(BaseModel):
    adapter: str | None = Field(description="as in `ClassifyResponse`; null: the bare base model")
    text: str
    finish_reason: Literal["stop", "length", "timeout"] = Field(
        description="stop: EOS or a stop string; length: max_new_tokens; timeout: cut off by the request "
        "deadline (REQUEST_TIMEOUT_S), the text is what was generated until then"
    )
    usage: GenerateUsage
    logprobs: list[TokenLogprobOut] | None = Field(
        None, exclude_if=is_none, description="per token, when `logprobs` was given"
    )


class GenerateChunk(BaseModel):
    """One server-sent event of a streamed ``/generate``: new text (with its tokens'
    log-probabilities when asked); the last one also carries ``finish_reason`` and ``usage``."""

    text: str
    finish_reason: Literal["stop", "length", "timeout"] | None = Field(None, exclude_if=is_none)
    usage: GenerateUsage | None = Field(None, exclude_if=is_none)
    logprobs: list[TokenLogprobOut] | None = Field(None, exclude_if=is_none)


class AdapterOut(BaseModel):
    name: str
    task: Task
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


class CompositionIn(StrictModel):
    name: str = Field(description="the composition's name: used wherever an adapter name is")
    members: Members = Field(min_length=1, max_length=MAX_MEMBERS, description="names or {name, weight}")
    method: Method = Field(
        description="classification: mean, vote, logits (ensembles) or cat, linear, ties (merges); "
        "generation: average (ensemble generation) or cat, linear, ties; embeddings: mean (of the "
        "members' vectors) or cat, linear, ties"
    )
    density: float = _DENSITY_FIELD

    @model_validator(mode="after")
    def _valid(self) -> CompositionIn:
        check_members(member_list(self.members, None), self.method)
        return self


class MemberOut(BaseModel):
    name: str
    weight: float
    version: int | None = Field(description="the member's current version (null: it is gone)")


class CompositionOut(BaseModel):
    name: str
    kind: Literal["composition"] = "composition"
    task: Task | None = Field(description="null: a member is gone")
    method: Method
    density: float
    members: list[MemberOut]
    labels: list[str] | None
    version: int
    created_at: float


class AdapterList(BaseModel):
    adapters: list[AdapterOut]
    compositions: list[CompositionOut] = Field(
        default_factory=list, description="named compositions (used by name like adapters)"
    )
