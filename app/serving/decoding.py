"""A request's decoding options (penalties, logit bias, minimum length, log-probabilities, structured
output) checked against the base and turned into the engine's :class:`SamplingParams` fields, and the
engine's log-probabilities into the wire's entries."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.engine.grammar import Grammars
from app.engine.types import SamplingParams, TokenLogprob
from app.errors import InvalidRequest
from app.protocol.decoding import DecodingOptions, TokenLogprobOut, TopLogprob


@dataclass(frozen=True)
class Constraint:
    """Structured output: a JSON schema (None with ``json_object``: any JSON object) or a regex."""

    kind: Literal["json_schema", "json_object", "regex", "call_or_text"]
    value: Any = None
    param: str = "response_format"


@dataclass(frozen=True)
class Decoding:
    options: DecodingOptions | None = None
    logprobs: int | None = None  # the top alternatives per token (0: the chosen token's only)
    constraint: Constraint | None = None

    async def to_sampling_params(
        self,
        grammars: Grammars,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
    ) -> SamplingParams:
        """The engine's parameters with these options checked against the base (4xx on what it
        cannot take); grammars are compiled and the tokenizer tables built off the event loop."""
        o = self.options
        pairs: tuple[tuple[int, float], ...] = ()
        if o is not None:
            pairs = o.bias_pairs
            if any(t >= grammars.vocab for t, _ in pairs):
                raise InvalidRequest(
                    f"logit_bias token ids must lie in [0, {grammars.vocab})", param="logit_bias"
                )
            if o.min_tokens is not None and o.min_tokens > max_new_tokens:
                raise InvalidRequest(
                    f"min_tokens ({o.min_tokens}) exceeds the tokens to generate ({max_new_tokens})",
                    param="min_tokens",
                )
        if self.logprobs is not None:
            await asyncio.to_thread(grammars.prepare)  # token bytes for the response
        grammar = None
        c = self.constraint
        if c is not None and c.kind == "regex":
            grammar = await asyncio.to_thread(grammars.regex, c.value, c.param)
        elif c is not None and c.kind == "call_or_text":
            grammar = await asyncio.to_thread(grammars.call_or_text, c.value, c.param)
        elif c is not None:
            grammar = await asyncio.to_thread(grammars.json_schema, c.value, c.param)
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            presence_penalty=(o.presence_penalty if o else None) or 0.0,
            frequency_penalty=(o.frequency_penalty if o else None) or 0.0,
            repetition_penalty=(o.repetition_penalty if o else None) or 1.0,
            logit_bias=pairs,
            min_tokens=(o.min_tokens if o else None) or 0,
            grammar=grammar,
            logprobs=self.logprobs,
        )


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI shows it: UTF-8, a token that ends inside a character escaped."""
    return raw.decode("utf-8", errors="backslashreplace")


def logprob_entries(lps: Sequence[TokenLogprob], token_bytes: list[bytes]) -> list[TokenLogprobOut]:
    """Log-probabilities as OpenAI's chat ``logprobs.content`` entries."""

    def top(token: int, logprob: float) -> TopLogprob:
        raw = token_bytes[token]
        return TopLogprob(token=token_text(raw), logprob=logprob, bytes=list(raw))

    return [
        TokenLogprobOut(**top(lp.token, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
        for lp in lps
    ]
