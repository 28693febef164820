"""A prompt's own tokens' log-probabilities (``echo`` with ``logprobs`` on /v1/completions, as
evaluation harnesses score answers): each token's after the ones before it, under the request's
adapter or the bare base, from one forward of the prompt in the classification lane (no KV cache,
beside other rows); and the results of ``max_tokens: 0``, which generates nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.engine.engine import Engine
from app.engine.types import Generation, GenerationResult, StreamDelta, TokenLogprob
from app.errors import InvalidRequest


async def prompt_logprobs(engine: Engine, gens: list[Generation], top: int) -> list[list[TokenLogprob]]:
    """Each generation's prompt tokens but the first: log-probability and ``top`` alternatives."""
    if any(g.members for g in gens):
        raise InvalidRequest(
            "echo with logprobs scores a prompt under one adapter; an ensemble's is not supported",
            param="model",
        )
    runs = [
        engine.classify(
            g.adapter.version if g.adapter else None,
            [g.prompt],
            g.adapter.weights if g.adapter else None,
            g.flow,
            output="logprobs",
            top=top,
        )
        for g in gens
    ]
    return [out[0] for out in await asyncio.gather(*runs)]


def no_result(gen: Generation) -> GenerationResult:
    """What ``max_tokens: 0`` answers: no token, finished by its length."""
    return GenerationResult(
        "", [], "length", len(gen.prompt), logprobs=[] if gen.params.logprobs is not None else None
    )


async def nothing_generated(gens: list[Generation]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """The stream of ``max_tokens: 0``: every choice ends at once."""
    for i, gen in enumerate(gens):
        yield i, StreamDelta("", result=no_result(gen))
