"""OpenAI's response shapes for generations: messages, tool calls, log-probabilities and the SSE
chunks of streamed chat and completions (used by :mod:`app.serving.openai_service`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app.engine.grammar import Grammars
from app.engine.types import GenerationResult, StreamDelta, TokenLogprob
from app.errors import AdapterServeError, openai_error_body, status_of
from app.protocol.decoding import TokenLogprobOut
from app.protocol.openai import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    FinishReason,
    FunctionCall,
    PromptTokensDetails,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from app.serving.decoding import logprob_entries
from app.serving.service import sse
from app.serving.tools import parse_tool_calls


def usage_of_results(prompt_tokens: int, results: list[GenerationResult]) -> Usage:
    cached = max((r.cached_tokens for r in results), default=0)
    return usage_of(prompt_tokens, sum(len(r.token_ids) for r in results), cached)


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """OpenAI's usage; ``cached_tokens``: of the prompt's, those taken from the prefix cache (with
    ``n`` choices, the most any choice took)."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def error_event(exc: AdapterServeError) -> str:
    return sse(openai_error_body(exc.type, exc.message, exc.param, status_of(exc)))


class ResultShape:
    """Results into OpenAI's shapes: log-probabilities, and tool calls parsed from the text."""

    def __init__(self, grammars: Grammars, tool_names: set[str] | None) -> None:
        self.grammars = grammars
        self.tool_names = tool_names  # None: the output is never a tool call

    def calls(self, text: str) -> list[ToolCall] | None:
        if self.tool_names is None:
            return None
        parsed = parse_tool_calls(text, self.tool_names)
        if parsed is None:
            return None
        return [
            ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=n, arguments=a))
            for n, a in parsed
        ]

    def message(self, text: str) -> AssistantMessage:
        calls = self.calls(text)
        return AssistantMessage(content=None, tool_calls=calls) if calls else AssistantMessage(content=text)

    def finish(self, result: GenerationResult) -> FinishReason:
        if result.finish_reason == "stop" and self.calls(result.text):
            return "tool_calls"
        return result.finish_reason

    def entries(self, lps: Sequence[TokenLogprob] | None) -> list[TokenLogprobOut] | None:
        return None if lps is None else logprob_entries(lps, self.grammars.token_bytes)

    def logprobs(self, lps: Sequence[TokenLogprob] | None) -> ChoiceLogprobs | None:
        entries = self.entries(lps)
        return None if entries is None else ChoiceLogprobs(content=entries)

    def legacy(self, lps: Sequence[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
        """The completions API's form; ``offset``: where the completion starts in the text (echo)."""
        entries = self.entries(lps)
        return None if entries is None else self._legacy(entries, offset)

    def prompt(self, ids: list[int], lps: Sequence[TokenLogprob]) -> CompletionLogprobs:
        """An echoed prompt's entries: its first token without a log-probability (as OpenAI's),
        then each token's after the ones before it (``lps``)."""
        out = self._legacy(logprob_entries([TokenLogprob(ids[0], 0.0), *lps], self.grammars.token_bytes), 0)
        out.token_logprobs[0] = out.top_logprobs[0] = None
        return out

    def _legacy(self, entries: list[TokenLogprobOut], offset: int) -> CompletionLogprobs:
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.token)
        return CompletionLogprobs(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
            text_offset=offsets,
        )


async def chat_events(
    header: dict[str, Any],
    deltas: AsyncIterator[tuple[int, StreamDelta]],
    n: int,
    include_usage: bool,
    prompt_tokens: int,
    shape: ResultShape,
) -> AsyncIterator[str]:
    """SSE chunks as OpenAI streams them: the role first, content deltas, a finish chunk per choice,
    the usage chunk (choices empty) when asked, then ``[DONE]``. When the output may be a tool call
    it is held until the choice ends and sent as one delta: the call, or the text."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(**header, choices=choices, usage=usage).payload(include_usage))

    def choice(
        index: int, delta: ChatDelta, finish: FinishReason | None = None, lps: ChoiceLogprobs | None = None
    ) -> str:
        return chunk([ChatChunkChoice(index=index, delta=delta, logprobs=lps, finish_reason=finish)])

    for i in range(n):
        yield choice(i, ChatDelta(role="assistant", content=""))
    completion = cached = 0
    held: dict[int, list[StreamDelta]] = {}
    try:
        async for i, d in deltas:
            if shape.tool_names is not None:
                held.setdefault(i, []).append(d)
                if d.result is None:
                    continue
                r = d.result
                calls = shape.calls(r.text)
                if calls:
                    delta = ChatDelta(
                        tool_calls=[ToolCallDelta(index=k, **c.model_dump()) for k, c in enumerate(calls)]
                    )
                else:
                    delta = ChatDelta(content="".join(x.text for x in held[i]))
                kept = [lp for x in held[i] for lp in x.logprobs] if r.logprobs is not None else None
                yield choice(i, delta, None, shape.logprobs(kept))
                completion += len(r.token_ids)
                cached = max(cached, r.cached_tokens)
                yield choice(i, ChatDelta(), shape.finish(r))
                continue
            entries = shape.logprobs(d.logprobs) if d.logprobs else None
            if d.text or entries is not None:
                yield choice(i, ChatDelta(content=d.text), None, entries)
            if d.result is not None:
                completion += len(d.result.token_ids)
                cached = max(cached, d.result.cached_tokens)
                yield choice(i, ChatDelta(), d.result.finish_reason)
        if include_usage:
            yield chunk([], usage_of(prompt_tokens, completion, cached))
    except AdapterServeError as exc:
        yield error_event(exc)
    yield "data: [DONE]\n\n"


async def completion_events(
    header: dict[str, Any],
    deltas: AsyncIterator[tuple[int, StreamDelta]],
    echoes: list[str],
    include_usage: bool,
    prompt_tokens: int,
    shape: ResultShape,
    echo_logprobs: list[CompletionLogprobs | None] | None = None,
) -> AsyncIterator[str]:
    """SSE chunks as OpenAI streams completions: each echoed prompt first (with its tokens'
    log-probabilities when asked), the text deltas, a finish chunk per choice, the usage, ``[DONE]``."""
    offsets = [len(e) for e in echoes]  # where each choice's next token starts in its text

    def chunk(choices: list[CompletionChunkChoice], usage: Usage | None = None) -> str:
        return sse(CompletionChunk(**header, choices=choices, usage=usage).payload(include_usage))

    def choice(
        index: int, text: str, finish: FinishReason | None = None, lps: tuple[TokenLogprob, ...] = ()
    ) -> str:
        legacy = shape.legacy(lps, offsets[index]) if lps else None
        if legacy is not None:
            offsets[index] += sum(len(t) for t in legacy.tokens)
        return chunk([CompletionChunkChoice(index=index, text=text, logprobs=legacy, finish_reason=finish)])

    for i, echo in enumerate(echoes):
        if echo:
            lps = echo_logprobs[i] if echo_logprobs else None
            yield chunk([CompletionChunkChoice(index=i, text=echo, logprobs=lps)])
    completion = cached = 0
    try:
        async for i, d in deltas:
            if d.result is None:
                if d.text or d.logprobs:
                    yield choice(i, d.text, None, d.logprobs)
                continue
            completion += len(d.result.token_ids)
            cached = max(cached, d.result.cached_tokens)
            yield choice(i, d.text, d.result.finish_reason, d.logprobs)
        if include_usage:
            yield chunk([], usage_of(prompt_tokens, completion, cached))
    except AdapterServeError as exc:
        yield error_event(exc)
    yield "data: [DONE]\n\n"


def joined(first: CompletionLogprobs | None, then: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """An echoed prompt's log-probabilities followed by its completion's."""
    if first is None or then is None:
        return first or then
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )
