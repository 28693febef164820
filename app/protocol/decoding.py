"""Request fields that shape decoding (penalties, logit bias, minimum length) and the log-probability
objects, shared by the native ``/generate`` and the OpenAI routes (same names and semantics as
OpenAI's, with vLLM's ``repetition_penalty`` and ``min_tokens``)."""

from __future__ import annotations

import math

from pydantic import (
    BaseModel,
    Field,
    field_validator,
)

from app.protocol.strict import StrictModel

MAX_TOP_LOGPROBS = 20  # as OpenAI's
MAX_LOGIT_BIAS = 300  # entries in one request's logit_bias (OpenAI documents none; vLLM none)


class DecodingOptions(StrictModel):
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="subtracted once from every token already generated"
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="subtracted per occurrence of a token already generated"
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        description="HF transformers' repetition penalty over prompt and generated tokens (1 = none)",
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, -100..100"
    )
    min_tokens: int | None = Field(None, ge=0, description="no end-of-sequence before this many tokens")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {key!r}")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise ValueError("logit_bias values lie in [-100, 100]")
        return v

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items() if b)


def is_none(value: object) -> bool:
    """For ``Field(exclude_if=is_none)``: a response field only some requests ask for is left out
    when absent, as OpenAI leaves it out."""
    return value is None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]
