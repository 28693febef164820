"""A request's decoding options (penalties, logit bias, minimum length, log-probabilities, structured
output) checked against the base and turned into the engine's :class:`SamplingParams` fields."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import InvalidRequest
from app.protocol.decoding import DecodingOptions
from app.structured import Grammars


@dataclass(frozen=True)
class Constraint:
    """Structured output: a JSON schema (None with ``json_object``: any JSON object) or a regex."""

    kind: Literal["json_schema", "json_object", "regex"]
    value: Any = None
    param: str = "response_format"


@dataclass(frozen=True)
class Decoding:
    options: DecodingOptions | None = None
    logprobs: int | None = None  # the top alternatives per token (0: the chosen token's only)
    constraint: Constraint | None = None


async def sampling_fields(d: Decoding, grammars: Grammars, max_new_tokens: int) -> dict[str, Any]:
    """The :class:`SamplingParams` fields for ``d`` (4xx on what the base cannot take); grammars are
    compiled and the tokenizer tables built off the event loop."""
    fields: dict[str, Any] = {}
    o = d.options
    if o is not None:
        fields["presence_penalty"] = o.presence_penalty or 0.0
        fields["frequency_penalty"] = o.frequency_penalty or 0.0
        fields["repetition_penalty"] = o.repetition_penalty or 1.0
        pairs = o.bias_pairs
        if any(t >= grammars.vocab for t, _ in pairs):
            raise InvalidRequest(
                f"logit_bias token ids must lie in [0, {grammars.vocab})", param="logit_bias"
            )
        fields["logit_bias"] = pairs
        if o.min_tokens is not None and o.min_tokens > max_new_tokens:
            raise InvalidRequest(
                f"min_tokens ({o.min_tokens}) exceeds the tokens to generate ({max_new_tokens})",
                param="min_tokens",
            )
        fields["min_tokens"] = o.min_tokens or 0
    if d.logprobs is not None:
        await asyncio.to_thread(grammars.prepare)  # token bytes for the response
        fields["logprobs"] = d.logprobs
    c = d.constraint
    if c is not None:
        if c.kind == "regex":
            fields["grammar"] = await asyncio.to_thread(grammars.regex, c.value, c.param)
        else:
            fields["grammar"] = await asyncio.to_thread(grammars.json_schema, c.value, c.param)
    return fields
