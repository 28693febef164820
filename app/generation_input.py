"""What a generation request becomes before the engine sees it: :class:`GenerationInput` (as any
API asks for it, untokenized) and :class:`Generation` (checked and tokenized, with its adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.adapters.kinds import Adapter
from app.adapters.registry import AdapterInfo
from app.adapters.version import AdapterVersion
from app.compositions import Composition
from app.decoding import Constraint, Decoding
from app.engine.types import Member, SamplingParams
from app.protocol.native import GenerateRequest, member_list

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

    @classmethod
    def of(cls, req: GenerateRequest) -> GenerationInput:
        comp = None
        if req.adapters is not None:
            comp = Composition.of(member_list(req.adapters, None), req.merge, req.density)
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
        )


def _constraint(req: GenerateRequest) -> Constraint | None:
    if req.json_schema is not None:
        return Constraint("json_schema", req.json_schema, "json_schema")
    return Constraint("regex", req.regex, "regex") if req.regex is not None else None


@dataclass(frozen=True)
class Generation:
    """A checked, tokenized generation ready for the engine."""

    info: AdapterInfo | None
    weights: Adapter | None
    prompt_ids: list[int]
    params: SamplingParams
    members: tuple[Member, ...] = ()  # ensemble generation (then no ``info``)
    label: str | None = None  # the composition's, for metrics

    @property
    def version(self) -> AdapterVersion | None:
        return self.info.handle if self.info is not None else None
