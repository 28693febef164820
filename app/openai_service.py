"""OpenAI-compatible completions, chat completions and model list on top of :class:`InferenceService`.

``model`` names an adapter, or the base model's id for no adapter. ``n`` choices and several prompts
become separate rows of the engine's batches; choice ``i`` samples with ``seed + i`` when a seed is
given, so that choices differ but the whole response is reproducible.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from app.adapters.registry import AdapterRegistry
from app.engine.types import GenerationResult, StreamDelta
from app.errors import AdapterNotFound, AdapterServeError, InvalidRequest, openai_error_body, status_of
from app.models.quantize import Quantization
from app.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from app.service import Generation, GenerationInput, InferenceService, sse

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send temperature 0 for greedy decoding


class OpenAIService:
    """Translates OpenAI requests into generations and the results back into OpenAI's objects."""

    def __init__(
        self,
        service: InferenceService,
        registry: AdapterRegistry,
        model_id: str,
        quantization: Quantization = "none",
    ) -> None:
        self.service = service
        self.quantization = quantization
        self.registry = registry
        self.model_id = model_id
        self.created = int(time.time())

    def adapter_of(self, model: str) -> str | None:
        """The adapter a ``model`` field names (None: the bare base model)."""
        return None if model == self.model_id else model

    async def _check_adapter(self, name: str) -> None:
        if await self.service.compositions.lookup(name) is not None:
            return
        await self.registry.lookup(name)
        if name not in self.registry:
            hint = self.registry.did_you_mean(name, (self.model_id,))
            raise AdapterNotFound(
                f"the model {name!r} is neither an adapter nor the base model {self.model_id!r}{hint} "
                "(GET /v1/models lists them)",
                param="model",
            )

    # --- models -----------------------------------------------------------------------------
    def models(self) -> ModelList:
        if self.service.cannot_generate:  # an encoder base: no model here can generate
            return ModelList(data=[])
        cards = [
            ModelCard(
                id=self.model_id, created=self.created, root=self.model_id, quantization=self.quantization
            )
        ]
        for info in self.registry.list():
            if info.task == "generate":
                cards.append(
                    ModelCard(
                        id=info.name, created=int(info.created_at), parent=self.model_id, root=info.name
                    )
                )
        compositions = self.service.compositions
        for comp in compositions.all():
            if compositions.describe(comp)["task"] == "generate":
                cards.append(
                    ModelCard(
                        id=comp.label, created=int(comp.created_at), parent=self.model_id, root=comp.label
                    )
                )
        return ModelList(data=cards)

    async def model(self, model: str) -> ModelCard:
        if model != self.model_id and await self.service.compositions.lookup(model) is None:
            await self.registry.lookup(model)
        for card in self.models().data:
            if card.id == model:
                return card
        raise AdapterNotFound(
            f"the model {model!r} does not exist (GET /v1/models lists them)", param="model"
        )

    # --- generation -------------------------------------------------------------------------
    def _input(self, req: CompletionRequest | ChatCompletionRequest, **prompt: Any) -> GenerationInput:
        return GenerationInput(
            adapter=self.adapter_of(req.model),
            temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list,
            **prompt,
        )

    async def _choices(self, inputs: list[GenerationInput], n: int) -> tuple[list[Generation], int]:
        """Every prompt's ``n`` choices as generations (index = prompt * n + choice); prompt tokens."""
        if inputs[0].adapter is not None:
            await self._check_adapter(inputs[0].adapter)
        limit = self.service.settings.max_choices
        if len(inputs) * n > limit:
            raise InvalidRequest(f"{len(inputs) * n} choices (prompts × n); at most {limit}", param="n")
        gens, prompt_tokens = [], 0
        for spec in inputs:
            gen = await self.service.prepare(spec)
            prompt_tokens += len(gen.prompt_ids)
            for i in range(n):
                seed = None if spec.seed is None else spec.seed + i
                gens.append(replace(gen, params=replace(gen.params, seed=seed)))
        return gens, prompt_tokens

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        messages = [m.as_template_message() for m in req.messages]
        spec = self._input(req, messages=messages, max_new_tokens=req.token_limit, default_new_tokens=None)
        gens, prompt_tokens = await self._choices([spec], req.n)
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        if req.stream:
            deltas = self.service.open_streams(gens)
            return _chat_events(header, deltas, len(gens), req.include_usage, prompt_tokens)
        results = await self.service.run(gens)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ]
        return ChatCompletion(**header, choices=choices, usage=_usage(prompt_tokens, results))

    async def complete(self, req: CompletionRequest) -> Completion | AsyncIterator[str]:
        prompts = req.prompts
        inputs = [
            self._input(req, prompt=p, max_new_tokens=req.max_tokens)
            if isinstance(p, str)
            else self._input(req, prompt_ids=p, max_new_tokens=req.max_tokens)
            for p in prompts
        ]
        gens, prompt_tokens = await self._choices(inputs, req.n)
        echoes = [self._echo(p) if req.echo else "" for p in prompts for _ in range(req.n)]
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        if req.stream:
            deltas = self.service.open_streams(gens)
            return _completion_events(header, deltas, echoes, req.include_usage, prompt_tokens)
        results = await self.service.run(gens)
        choices = [
            CompletionChoice(index=i, text=echoes[i] + r.text, finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ]
        return Completion(**header, choices=choices, usage=_usage(prompt_tokens, results))

    def _echo(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else str(self.service.tokenizer.decode(prompt))


def _usage(prompt_tokens: int, results: list[GenerationResult]) -> Usage:
    return Usage(**_usage_of(prompt_tokens, sum(len(r.token_ids) for r in results)))


def _usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error_event(exc: AdapterServeError) -> str:
    return sse(openai_error_body(exc.type, exc.message, exc.param, status_of(exc)))


async def _chat_events(
    header: dict[str, Any],
    deltas: AsyncIterator[tuple[int, StreamDelta]],
    n: int,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    """SSE chunks as OpenAI streams them: the role first, content deltas, a finish chunk per choice,
    the usage chunk (choices empty) when asked, then ``[DONE]``."""
    base = {**header, "object": "chat.completion.chunk", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    completion = 0
    try:
        async for i, d in deltas:
            if d.text:
                yield chunk(i, {"content": d.text})
            if d.result is not None:
                completion += len(d.result.token_ids)
                yield chunk(i, {}, d.result.finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage_of(prompt_tokens, completion)})
    except AdapterServeError as exc:
        yield _error_event(exc)
    yield "data: [DONE]\n\n"


async def _completion_events(
    header: dict[str, Any],
    deltas: AsyncIterator[tuple[int, StreamDelta]],
    echoes: list[str],
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    base = {**header, "object": "text_completion", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, text: str, finish: str | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    for i, echo in enumerate(echoes):
        if echo:
            yield chunk(i, echo)
    completion = 0
    try:
        async for i, d in deltas:
            if d.result is None:
                if d.text:
                    yield chunk(i, d.text)
                continue
            completion += len(d.result.token_ids)
            yield chunk(i, d.text, d.result.finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage_of(prompt_tokens, completion)})
    except AdapterServeError as exc:
        yield _error_event(exc)
    yield "data: [DONE]\n\n"
