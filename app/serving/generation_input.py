"""What a generation request is before the engine sees it: :class:`GenerationInput`, as any API asks
for it (untokenized; the native route and the OpenAI routes build it), turned by the service into
the engine's :class:`app.engine.types.Generation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.adapters.composition import Composition
from app.engine.grammar import Grammars
from app.engine.types import SamplingParams
from app.protocol.native import GenerateRequest, member_list
from app.serving.decoding import Constraint, Decoding
from app.tenants import EVERYONE, Tenant

DEFAULT_NEW_TOKENS = 128


@dataclass(frozen=True)
class GenerationInput:
    """One generation as any API asks for it: exactly one of prompt, messages or prompt_ids."""

    adapter: str | None  # an adapter or a named composition (None: the bare base)
    composition: Composition | None = None  # by request (``adapters``) instead of ``adapter``
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int | None = None  # None = default_new_tokens
    default_new_tokens: int | None = DEFAULT_NEW_TOKENS  # None = as many as the cap and context allow
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    decoding: Decoding = field(default_factory=Decoding)  # penalties, bias, logprobs, structured output
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template with ``messages``
    tenant: Tenant = EVERYONE  # whose request: the adapters it may use
    priority: int = 0  # among its tenant's requests: lower first

    @classmethod
    def of(cls, req: GenerateRequest, tenant: Tenant = EVERYONE) -> GenerationInput:
        comp = None
        if req.adapters is not None:
            members = ((m.name, m.weight) for m in member_list(req.adapters, None))
            comp = Composition.of(members, req.merge, req.density)
        return cls(
            adapter=req.adapter,
            composition=comp,
            prompt=req.prompt,
            messages=[m.model_dump() for m in req.messages] if req.messages is not None else None,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=tuple(req.stop_list),
            decoding=Decoding(req, req.logprobs, _constraint(req)),
            tenant=tenant,
            priority=req.priority,
        )

    async def to_sampling_params(self, grammars: Grammars, max_new_tokens: int) -> SamplingParams:
        """The engine's sampling parameters for ``max_new_tokens`` new tokens (4xx on decoding
        options the base cannot take)."""
        return await self.decoding.to_sampling_params(
            grammars,
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
        )


def _constraint(req: GenerateRequest) -> Constraint | None:
    if req.json_schema is not None:
        return Constraint("json_schema", req.json_schema, "json_schema")
    return Constraint("regex", req.regex, "regex") if req.regex is not None else None
