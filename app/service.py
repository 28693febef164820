"""Serving logic between the routes and the engine: tokenization, limits, result shaping."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from app.adapters.lora import LoraAdapter
from app.adapters.registry import AdapterInfo, AdapterRegistry
from app.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    ClassifyUsage,
    GenerateRequest,
    GenerateResponse,
    GenerateUsage,
)
from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import GenerateWork, SamplingParams, StreamDelta
from app.errors import InvalidRequest, error_body

DEFAULT_NEW_TOKENS = 128


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def load_on_device(registry: AdapterRegistry, engine: Engine, name: str) -> AdapterInfo:
    """Bring the current version of ``name`` into host memory and a device slot now."""
    info, weights = await asyncio.to_thread(registry.load, name)
    await engine.command("load", (info, weights))
    return info


class InferenceService:
    """Owns request semantics; the engine only sees token ids and sampling parameters."""

    def __init__(
        self,
        settings: Settings,
        registry: AdapterRegistry,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        max_context: int | None = None,
    ) -> None:
        self.max_context = max_context  # prompt + new tokens must fit the base model's positions
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.tokenizer = tokenizer

    def _encode(self, text: str, param: str) -> list[int]:
        ids: list[int] = self.tokenizer(text)["input_ids"]
        if not ids:
            raise InvalidRequest(f"{param} encodes to no tokens", param=param)
        if len(ids) > self.settings.max_input_tokens:
            raise InvalidRequest(
                f"{param} has {len(ids)} tokens; the limit is {self.settings.max_input_tokens}", param=param
            )
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    async def adapter(
        self, name: str, task: Literal["classify", "generate"]
    ) -> tuple[AdapterInfo, LoraAdapter]:
        """The current version of adapter ``name`` with its weights (read from the store on first use;
        only this request waits for that)."""
        info = self.registry.for_task(name, task)
        weights = self.registry.cached(info)
        if weights is not None:
            return info, weights
        return await asyncio.to_thread(self.registry.load, name, task)

    async def classify(self, req: ClassifyRequest) -> ClassifyResponse:
        self.registry.for_task(req.adapter, "classify")  # 404/409 before any other check
        texts = req.texts
        if len(texts) > self.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"{len(texts)} inputs; at most {self.settings.max_inputs_per_request} per request",
                param="inputs",
            )
        ids = await asyncio.to_thread(lambda: [self._encode(t, "inputs") for t in texts])
        info, weights = await self.adapter(req.adapter, "classify")
        self.registry.touch(info)
        probs = await self.engine.classify(info, ids, weights)
        labels = info.labels
        results = []
        for row in probs:
            ranked = sorted(zip(labels, row, strict=True), key=lambda x: x[1], reverse=True)
            if req.top_k is not None:
                ranked = ranked[: req.top_k]
            results.append(ClassifyResult(label=ranked[0][0], score=ranked[0][1], scores=dict(ranked)))
        return ClassifyResponse(
            adapter=info.name, results=results, usage=ClassifyUsage(input_tokens=sum(len(i) for i in ids))
        )

    async def _prepare(
        self, req: GenerateRequest
    ) -> tuple[AdapterInfo | None, LoraAdapter | None, list[int], SamplingParams]:
        if req.adapter is not None:
            self.registry.for_task(req.adapter, "generate")  # 404/409 before any other check
        cap = self.settings.max_new_tokens
        max_new_tokens = req.max_new_tokens or min(DEFAULT_NEW_TOKENS, cap)
        if max_new_tokens > cap:
            raise InvalidRequest(
                f"max_new_tokens {max_new_tokens} exceeds the limit {cap}", param="max_new_tokens"
            )
        if req.messages is not None:
            messages = [m.model_dump() for m in req.messages]
            prompt_ids = await asyncio.to_thread(self._encode_chat, messages)
        else:
            prompt_ids = await asyncio.to_thread(self._encode, req.prompt or "", "prompt")
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=tuple(req.stop_list),
        )
        if self.max_context and len(prompt_ids) + max_new_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the base "
                f"model's context of {self.max_context} tokens",
                param="max_new_tokens",
            )
        info, weights = None, None
        if req.adapter is not None:
            info, weights = await self.adapter(req.adapter, "generate")
            self.registry.touch(info)
        return info, weights, prompt_ids, params

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        info, weights, prompt_ids, params = await self._prepare(req)
        result = await self.engine.generate(info, prompt_ids, params, weights)
        return GenerateResponse(
            adapter=req.adapter,
            text=result.text,
            finish_reason=result.finish_reason,
            usage=GenerateUsage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        )

    async def stream(self, req: GenerateRequest) -> AsyncIterator[str]:
        """Queue a streamed generation (errors raise before any byte is sent); return its SSE events."""
        info, weights, prompt_ids, params = await self._prepare(req)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[StreamDelta] = asyncio.Queue()

        def sink(delta: StreamDelta) -> None:  # engine thread
            with contextlib.suppress(RuntimeError):  # the client's loop is gone
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        work = self.engine.submit_stream(info, prompt_ids, params, sink, weights)
        return self._events(work, deltas)

    async def _events(self, work: GenerateWork, deltas: asyncio.Queue[StreamDelta]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(deltas.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    yield sse(
                        {"error": error_body("deadline_exceeded", "request ran past its deadline")["error"]}
                    )
                    break
                if delta.error is not None:
                    yield sse({"error": error_body("engine_error", delta.error)["error"]})
                    break
                if delta.result is None:
                    if delta.text:
                        yield sse({"text": delta.text})
                    continue
                r = delta.result
                usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids)}
                yield sse({"text": delta.text, "finish_reason": r.finish_reason, "usage": usage})
                break
            yield "data: [DONE]\n\n"
        finally:
            work.cancelled = True  # a client that went away frees its row at the next step

    def _encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                "the base model has no chat template; send a prompt instead", param="messages"
            )
        try:
            text = self.chat_prompt(messages)
        except (ValueError, TemplateError) as exc:
            raise InvalidRequest(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.settings.max_input_tokens:
            raise InvalidRequest(
                f"messages have {len(ids)} tokens; the limit is {self.settings.max_input_tokens}",
                param="messages",
            )
        return ids
