"""Serving logic between the routes and the engine: tokenization, limits, result shaping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from functools import cached_property
from typing import Any, TypeVar

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from app.adapters.catalog import AdapterCatalog
from app.adapters.composition import Composition
from app.adapters.methods import is_combine
from app.adapters.records import Target
from app.config import Settings
from app.engine.engine import DEADLINE_GRACE_S, Engine
from app.engine.grammar import Grammars
from app.engine.types import (
    ONE_FLOW,
    Flow,
    GenerateWork,
    Generation,
    GenerationResult,
    Member,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
)
from app.errors import (
    AdapterServeError,
    DeadlineExceeded,
    GenerationUnsupported,
    InvalidRequest,
    TooManyStreams,
    error_body,
)
from app.protocol.decoding import TokenLogprobOut
from app.protocol.native import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    GenerateUsage,
)
from app.serving import explanations
from app.serving.chat_tokens import ChatTokens
from app.serving.decoding import logprob_entries
from app.serving.ensembles import classification_results
from app.serving.generation_input import GenerationInput
from app.tenants import EVERYONE, Tenant

log = logging.getLogger(__name__)


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class InferenceService:
    """Owns request semantics; the engine only sees token ids and sampling parameters."""

    def __init__(
        self,
        settings: Settings,
        catalog: AdapterCatalog,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        max_context: int | None = None,
        cannot_generate: str = "",
    ) -> None:
        self.max_context = max_context  # prompt + new tokens must fit the base model's positions
        self.cannot_generate = cannot_generate  # why the base cannot generate ("" when it can)
        self.settings = settings
        self.catalog = catalog
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_tokens = ChatTokens(tokenizer)  # a conversation's earlier turns tokenized once
        self._streams: dict[int, list[GenerateWork]] = {}  # open streams' works (the event loop's)
        self._stream_ids = itertools.count()

    @property
    def grammars(self) -> Grammars:
        return self.engine.runner.grammars

    def open_stream_count(self) -> int:
        """Streams still generating (a stream ends when its rows finish or fail, or its client leaves)."""
        self._streams = {k: ws for k, ws in self._streams.items() if any(not w.future.done() for w in ws)}
        return len(self._streams)

    def _encode(self, text: str, param: str) -> list[int]:
        return self._encoded(self.tokenizer(text)["input_ids"], param)

    def _encoded(self, ids: list[int], param: str) -> list[int]:
        """``ids`` of a text when it encodes to some tokens within MAX_INPUT_TOKENS, else a 422."""
        if not ids:
            raise InvalidRequest(f"{param} encodes to no tokens", param=param)
        return self._within_limit(ids, param)

    def _within_limit(self, ids: list[int], param: str) -> list[int]:
        """``ids`` when they fit MAX_INPUT_TOKENS, else a 422 naming ``param``."""
        if len(ids) > self.settings.max_input_tokens:
            raise InvalidRequest(
                f"{param}: {len(ids)} tokens; the limit is {self.settings.max_input_tokens}", param=param
            )
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                tools=tools,  # type: ignore[arg-type]
                tokenize=False,
                add_generation_prompt=True,
            )
        )

    @cached_property
    def template_takes_tools(self) -> bool:
        """Whether the base's chat template renders tools (a prompt with a tool differs from one without)."""
        probe = [{"type": "function", "function": {"name": "probe_tool", "parameters": {"type": "object"}}}]
        messages = [{"role": "user", "content": "hi"}]
        try:
            return "probe_tool" in self.chat_prompt(messages, probe)
        except (ValueError, TemplateError):
            return False

    async def classify(self, req: ClassifyRequest, tenant: Tenant = EVERYONE) -> ClassifyResponse:
        """One adapter, an ensemble (every member runs its own rows of the same batches and the
        members' probabilities are combined per input) or a merged adapter."""
        adhoc = None
        if req.adapters is not None:
            adhoc = Composition.of(((m.name, m.weight) for m in req.members), req.method, req.density)
        target = await self.catalog.resolve(req.adapter, "classify", adhoc, tenant.may_use)
        texts = req.texts
        if len(texts) > self.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"{len(texts)} inputs; at most {self.settings.max_inputs_per_request} per request",
                param="inputs",
            )
        encoded = None  # with explain: the tokens' offsets too (one tokenization either way)
        if req.explain is None:
            ids = await off_loop(sum(map(len, texts)), lambda: [self._encode(t, "inputs") for t in texts])
        else:
            encoded = await off_loop(
                sum(map(len, texts)), lambda: [explanations.encode(self.tokenizer, t) for t in texts]
            )
            ids = [self._encoded(e.ids, "inputs") for e in encoded]
            explanations.check(req.explain, encoded, self.settings)
        longest = max((len(i) for i in ids), default=0)
        if self.max_context is not None and longest > self.max_context:
            raise InvalidRequest(
                f"inputs: {longest} tokens; the base model reads at most {self.max_context}", param="inputs"
            )
        self.catalog.touch(target)
        members = target.members
        flow = flow_of(tenant, target, req.priority)
        probs = await asyncio.gather(
            *(self.engine.classify(h.record.handle, ids, h.weights, flow) for h in members)
        )
        method = target.method
        assert is_combine(method), "a classification target combines with mean, vote or logits"
        results = classification_results(
            [(h.record.name, h.record.labels) for h in members],
            probs,
            [h.weight for h in members] if target.ensemble else [1.0],
            method,
            req.top_k,
            req.return_members and target.ensemble,
        )
        if req.explain is not None and encoded is not None:
            await explanations.explain_target(self.engine, target, encoded, req.explain, results, flow)
        return ClassifyResponse(
            adapter=req.target, results=results, usage=ClassifyUsage(input_tokens=sum(len(i) for i in ids))
        )

    async def prepare(self, spec: GenerationInput) -> Generation:
        """Check and tokenize one generation request; 4xx errors raise here, before any work is queued.
        Its adapter or composition is resolved once, here: the generation runs on those versions."""
        if self.cannot_generate:
            raise GenerationUnsupported(self.cannot_generate)
        target = await self.catalog.resolve(spec.adapter, "generate", spec.composition, spec.tenant.may_use)
        cap = self.settings.max_new_tokens
        if spec.max_new_tokens is not None and spec.max_new_tokens > cap:
            raise InvalidRequest(
                f"{spec.max_new_tokens} new tokens asked; the limit is {cap}", param="max_new_tokens"
            )
        if spec.messages is not None:
            size = sum(len(str(m.get("content") or "")) for m in spec.messages) + len(str(spec.tools or ""))
            prompt_ids = await off_loop(size, self._encode_chat, spec.messages, spec.tools)
        elif spec.prompt_ids is not None:
            prompt_ids = self._check_ids(spec.prompt_ids)
        else:
            prompt_ids = await off_loop(len(spec.prompt or ""), self._encode, spec.prompt or "", "prompt")
        room = self.max_context - len(prompt_ids) if self.max_context else cap
        max_new_tokens = spec.max_new_tokens
        if max_new_tokens is None:  # the default: what the request kind asks, within cap and context
            max_new_tokens = min(spec.default_new_tokens or cap, cap, room)
        if max_new_tokens > room or max_new_tokens < (0 if spec.max_new_tokens == 0 else 1):  # 0: echo only
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the base "
                f"model's context of {self.max_context} tokens",
                param="max_new_tokens",
            )
        params = await spec.to_sampling_params(self.grammars, max_new_tokens)
        self.catalog.touch(target)
        return generation_of(target, prompt_ids, params, flow_of(spec.tenant, target, spec.priority))

    async def run(self, gens: list[Generation]) -> list[GenerationResult]:
        """Run generations concurrently (they share the engine's batches); one failure cancels all."""
        tasks = [asyncio.ensure_future(self.engine.generate(g)) for g in gens]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    def open_streams(self, gens: list[Generation]) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Queue streamed generations (errors raise before any byte is sent) and return their deltas,
        each tagged with its index in ``gens``, as they come. The iterator raises
        :class:`DeadlineExceeded` or :class:`EngineFailure`; leaving it early aborts the rest."""
        if self.open_stream_count() >= self.settings.max_streams:
            raise TooManyStreams(
                f"{self.settings.max_streams} streams are open (MAX_STREAMS); retry shortly", param="stream"
            )
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[int, StreamDelta]] = asyncio.Queue()

        def sink_for(index: int) -> Callable[[StreamDelta], None]:
            def sink(delta: StreamDelta) -> None:  # engine thread
                with contextlib.suppress(RuntimeError):  # the client's loop is gone
                    loop.call_soon_threadsafe(deltas.put_nowait, (index, delta))

            return sink

        works: list[GenerateWork] = []
        try:
            for i, g in enumerate(gens):
                works.append(self.engine.submit(g, sink_for(i)))
        except BaseException:
            for work in works:
                self.engine.abort(work)
            raise
        key = next(self._stream_ids)
        self._streams[key] = works
        return self._deltas(key, works, deltas)

    async def _deltas(
        self, key: int, works: list[GenerateWork], deltas: asyncio.Queue[tuple[int, StreamDelta]]
    ) -> AsyncIterator[tuple[int, StreamDelta]]:
        loop = asyncio.get_running_loop()
        # the engine ends each row at its deadline (with its tokens, or a 504 error event); this
        # later one only guards against an engine step that never returns
        deadline = loop.time() + self.settings.request_timeout_s + DEADLINE_GRACE_S
        pending = len(works)
        try:
            while pending:
                try:
                    index, delta = await asyncio.wait_for(deltas.get(), max(0.0, deadline - loop.time()))
                except TimeoutError as exc:
                    raise DeadlineExceeded.after(self.settings.request_timeout_s) from exc
                if delta.error is not None:
                    raise delta.error
                if delta.result is not None:
                    pending -= 1
                yield index, delta
        finally:
            self._streams.pop(key, None)
            for work in works:  # a client that went away frees its rows at the next step
                self.engine.abort(work)

    async def generate(self, req: GenerateRequest, tenant: Tenant = EVERYONE) -> GenerateResponse:
        (result,) = await self.run([await self.prepare(GenerationInput.of(req, tenant))])
        return GenerateResponse(
            adapter=req.target,
            text=result.text,
            finish_reason=result.finish_reason,
            usage=GenerateUsage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=len(result.token_ids),
                cached_tokens=result.cached_tokens,
            ),
            logprobs=self._logprobs(result.logprobs),
        )

    def _logprobs(
        self, lps: list[TokenLogprob] | tuple[TokenLogprob, ...] | None
    ) -> list[TokenLogprobOut] | None:
        return None if lps is None else logprob_entries(lps, self.grammars.token_bytes)

    async def stream(self, req: GenerateRequest, tenant: Tenant = EVERYONE) -> AsyncIterator[str]:
        """Queue a streamed generation (errors raise before any byte is sent); return its SSE events."""
        deltas = self.open_streams([await self.prepare(GenerationInput.of(req, tenant))])
        return self._events(deltas, req.logprobs is not None)

    async def _events(
        self, deltas: AsyncIterator[tuple[int, StreamDelta]], logprobs: bool
    ) -> AsyncIterator[str]:
        try:
            async for _, delta in deltas:
                lps = (self._logprobs(delta.logprobs) or []) if logprobs else None
                r = delta.result
                if r is None:
                    if delta.text or lps:
                        yield sse(GenerateChunk(text=delta.text, logprobs=lps).model_dump())
                    continue
                usage = GenerateUsage(
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=len(r.token_ids),
                    cached_tokens=r.cached_tokens,
                )
                last = GenerateChunk(
                    text=delta.text, finish_reason=r.finish_reason, usage=usage, logprobs=lps
                )
                yield sse(last.model_dump())
        except AdapterServeError as exc:
            yield sse(error_body(exc.type, exc.message, exc.param))
        yield "data: [DONE]\n\n"

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = len(self.tokenizer)
        if not ids:
            raise InvalidRequest("prompt has no tokens", param="prompt")
        if any(not 0 <= i < vocab for i in ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return self._within_limit(list(ids), "prompt")

    def _encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                "the base model has no chat template; send a prompt instead", param="messages"
            )
        try:
            text = self.chat_prompt(messages, tools)
        except (ValueError, TemplateError) as exc:
            raise InvalidRequest(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
        return self._within_limit(self.chat_tokens(text), "messages")


T = TypeVar("T")
INLINE_CHARS = 4096  # texts up to this size are tokenized on the event loop


async def off_loop(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (tokenizing ``chars`` characters of text): in a worker thread for long texts,
    so the event loop stays free; on the loop itself for short ones, where the hop to a thread
    and back would cost more than the tokenizing (docs/prefix-cache.md#short-requests)."""
    if chars <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def flow_of(tenant: Tenant, target: Target, priority: int) -> Flow:
    """Whose work a request is, for fair admission: its tenant and the adapter or composition."""
    return Flow(tenant.name, tenant.weight, target.label or "", priority, tenant.queue_share)


def generation_of(
    target: Target, prompt: list[int], params: SamplingParams, flow: Flow = ONE_FLOW
) -> Generation:
    """The engine's record of a generation on ``target`` (the bare base, an adapter or an ensemble)."""
    rows = tuple(Member(h.record.handle, h.weights, h.weight) for h in target.members)
    if target.ensemble:
        return Generation(prompt, params, members=rows, label=target.label, flow=flow)
    label = target.label if target.composition else None
    return Generation(prompt, params, adapter=rows[0] if rows else None, label=label, flow=flow)
