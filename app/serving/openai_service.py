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

from app.adapters.catalog import AdapterCatalog
from app.engine.types import Generation
from app.errors import AdapterNotFound, InvalidRequest
from app.models.quantize import Quantization
from app.protocol.openai import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from app.serving.decoding import Constraint, Decoding
from app.serving.generation_input import GenerationInput
from app.serving.openai_results import (
    ResultShape,
    chat_events,
    completion_events,
    joined,
    usage_of_results,
)
from app.serving.prompt_logprobs import no_result, nothing_generated, prompt_logprobs
from app.serving.service import InferenceService
from app.serving.tool_prompt import render_tools
from app.serving.tools import tool_call_schema
from app.tenants import EVERYONE, Tenant

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send temperature 0 for greedy decoding


class OpenAIService:
    """Translates OpenAI requests into generations and the results back into OpenAI's objects."""

    def __init__(
        self,
        service: InferenceService,
        catalog: AdapterCatalog,
        model_id: str,
        quantization: Quantization = "none",
    ) -> None:
        self.service = service
        self.quantization = quantization
        self.catalog = catalog
        self.model_id = model_id
        self.created = int(time.time())

    def adapter_of(self, model: str) -> str | None:
        """The adapter a ``model`` field names (None: the bare base model)."""
        return None if model == self.model_id else model

    async def check_model(self, name: str, tenant: Tenant) -> None:
        """404 (OpenAI's ``model_not_found``) unless ``name`` is an adapter or composition ``tenant``
        may use."""
        await self.catalog.lookup(name)
        known = name in self.catalog or self.catalog.composition(name) is not None
        if not (known and tenant.may_use(name)):
            hint = self.catalog.did_you_mean(name, (self.model_id,), tenant.may_use)
            raise AdapterNotFound(
                f"the model {name!r} is neither an adapter nor the base model {self.model_id!r}{hint} "
                "(GET /v1/models lists them)",
                param="model",
            )

    # --- models -----------------------------------------------------------------------------
    def models(self, tenant: Tenant = EVERYONE) -> ModelList:
        """The base and the generation and embedding adapters and compositions ``tenant`` may use
        (an encoder base: the base and the embedding ones, for /v1/embeddings)."""
        tasks = ("embed",) if self.service.cannot_generate else ("generate", "embed")
        cards = [
            ModelCard(
                id=self.model_id, created=self.created, root=self.model_id, quantization=self.quantization
            )
        ]
        catalog = self.catalog
        for info in catalog.adapters():
            if info.task in tasks and tenant.may_use(info.name):
                cards.append(
                    ModelCard(
                        id=info.name, created=int(info.created_at), parent=self.model_id, root=info.name
                    )
                )
        for comp in catalog.compositions():
            usable = all(tenant.may_use(n) for n in [comp.label, *comp.names])
            if usable and catalog.describe_composition(comp)["task"] in tasks:
                cards.append(
                    ModelCard(
                        id=comp.label, created=int(comp.created_at), parent=self.model_id, root=comp.label
                    )
                )
        return ModelList(data=cards)

    async def model(self, model: str, tenant: Tenant = EVERYONE) -> ModelCard:
        if model != self.model_id:
            await self.catalog.lookup(model)
        for card in self.models(tenant).data:
            if card.id == model:
                return card
        raise AdapterNotFound(
            f"the model {model!r} does not exist (GET /v1/models lists them)", param="model"
        )

    # --- generation -------------------------------------------------------------------------
    def _input(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        logprobs: int | None,
        tenant: Tenant,
        constraint: Constraint | None = None,
        **prompt: Any,
    ) -> GenerationInput:
        return GenerationInput(
            adapter=self.adapter_of(req.model),
            tenant=tenant,
            priority=req.priority,
            temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list,
            decoding=Decoding(req, logprobs, constraint),
            **prompt,
        )

    def _chat_input(self, req: ChatCompletionRequest, tenant: Tenant) -> GenerationInput:
        """The generation a chat request asks for: tools rendered by the template, a forced tool call
        or a JSON response_format as the grammar."""
        messages = [m.as_template_message() for m in req.messages]
        uses_tools = req.calls_tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if uses_tools else None
        forced, name = req.forced_tool
        rendered = uses_tools and not self.service.template_takes_tools  # the server renders tools
        if rendered:
            offered = tools if req.calls_tools else None
            messages, tools = render_tools(messages, offered, forced), None
        constraint = None
        if forced:
            assert req.tools is not None
            schema = tool_call_schema([t.model_dump(exclude_none=True) for t in req.tools], name)
            constraint = Constraint("json_schema", schema, "tool_choice")
        elif req.response_format is not None and req.response_format.type == "json_object":
            constraint = Constraint("json_object")
        elif req.response_format is not None and req.response_format.json_schema is not None:
            schema = req.response_format.json_schema.schema_ or {}
            constraint = Constraint("json_schema", schema, "response_format")
        elif rendered and req.calls_tools:  # auto: a call of one of the tools, or plain text
            assert req.tools is not None
            schema = tool_call_schema([t.model_dump(exclude_none=True) for t in req.tools], None)
            constraint = Constraint("call_or_text", schema, "tools")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._input(
            req,
            logprobs,
            tenant,
            constraint,
            messages=messages,
            tools=tools,
            max_new_tokens=req.token_limit,
            default_new_tokens=None,
        )

    async def _choices(self, inputs: list[GenerationInput], n: int) -> tuple[list[Generation], int]:
        """Every prompt's ``n`` choices as generations (index = prompt * n + choice); prompt tokens."""
        if inputs[0].adapter is not None:
            await self.check_model(inputs[0].adapter, inputs[0].tenant)
        limit = self.service.settings.max_choices
        if len(inputs) * n > limit:
            raise InvalidRequest(f"{len(inputs) * n} choices (prompts × n); at most {limit}", param="n")
        gens, prompt_tokens = [], 0
        for spec in inputs:
            gen = await self.service.prepare(spec)
            prompt_tokens += len(gen.prompt)
            for i in range(n):
                seed = None if spec.seed is None else spec.seed + i
                gens.append(replace(gen, params=replace(gen.params, seed=seed)))
        return gens, prompt_tokens

    async def chat(
        self, req: ChatCompletionRequest, tenant: Tenant = EVERYONE
    ) -> ChatCompletion | AsyncIterator[str]:
        gens, prompt_tokens = await self._choices([self._chat_input(req, tenant)], req.n)
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        shape = ResultShape(
            self.service.grammars, {t.function.name for t in req.tools or []} if req.calls_tools else None
        )
        if req.stream:
            deltas = self.service.open_streams(gens)
            return chat_events(header, deltas, len(gens), req.include_usage, prompt_tokens, shape)
        results = await self.service.run(gens)
        choices = [
            ChatChoice(
                index=i,
                message=shape.message(r.text),
                finish_reason=shape.finish(r),
                logprobs=shape.logprobs(r.logprobs),
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletion(**header, choices=choices, usage=usage_of_results(prompt_tokens, results))

    async def complete(
        self, req: CompletionRequest, tenant: Tenant = EVERYONE
    ) -> Completion | AsyncIterator[str]:
        prompts = req.prompts
        inputs = [
            self._input(req, req.logprobs, tenant, prompt=p, max_new_tokens=req.max_tokens)
            if isinstance(p, str)
            else self._input(req, req.logprobs, tenant, prompt_ids=p, max_new_tokens=req.max_tokens)
            for p in prompts
        ]
        gens, prompt_tokens = await self._choices(inputs, req.n)
        echoes = [self._echo(p) if req.echo else "" for p in prompts for _ in range(req.n)]
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        shape = ResultShape(self.service.grammars, None)
        scored: list[CompletionLogprobs | None] = [None] * len(gens)
        if req.echo and req.logprobs is not None:  # the prompts' own tokens, one forward each
            firsts = gens[:: req.n]
            lps = await prompt_logprobs(self.service.engine, firsts, req.logprobs)
            scored = [
                shape.prompt(g.prompt, lp) for g, lp in zip(firsts, lps, strict=True) for _ in range(req.n)
            ]
        if req.stream:
            deltas = self.service.open_streams(gens) if req.max_tokens != 0 else nothing_generated(gens)
            return completion_events(header, deltas, echoes, req.include_usage, prompt_tokens, shape, scored)
        results = await self.service.run(gens) if req.max_tokens != 0 else [no_result(g) for g in gens]
        choices = [
            CompletionChoice(
                index=i,
                text=echoes[i] + r.text,
                finish_reason=r.finish_reason,
                logprobs=joined(scored[i], shape.legacy(r.logprobs, len(echoes[i]))),
            )
            for i, r in enumerate(results)
        ]
        return Completion(**header, choices=choices, usage=usage_of_results(prompt_tokens, results))

    def _echo(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else str(self.service.tokenizer.decode(prompt))
