"""Work items passed from the API side to the engine thread, and their results."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from app.adapters.kinds import Adapter
from app.adapters.registry import AdapterInfo


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


@dataclass
class ClassifyWork:
    adapter: AdapterInfo
    weights: Adapter  # held until the work is done: host eviction cannot take them away
    inputs: list[list[int]]  # token ids per input text
    future: Future[list[list[float]]] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


@dataclass(frozen=True)
class StreamDelta:
    """New text of a streamed generation; the last one carries the result."""

    text: str
    result: GenerationResult | None = None
    error: str | None = None


@dataclass
class GenerateWork:
    adapter: AdapterInfo | None  # None = the bare base model
    weights: Adapter | None
    prompt: list[int]
    params: SamplingParams
    future: Future[GenerationResult] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    sink: Callable[[StreamDelta], None] | None = None  # thread-safe; set for streamed requests
    first_token_at: float | None = None


@dataclass
class Command:
    """A change to engine state (unload an adapter...) applied between forwards."""

    action: str
    arg: Any = None
    future: Future[None] = field(default_factory=Future)


Work = ClassifyWork | GenerateWork | Command
