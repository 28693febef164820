"""What passes between the API side and the engine thread: work items, commands and results.

Work and commands are put into the engine's inbox by any thread; from then on only the engine
thread writes them (the API side that gives up on a work item sends :class:`Abort`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from app.adapters.kinds import Adapter
from app.adapters.version import AdapterVersion
from app.engine.explain import ExplainSpec, Explanation
from app.errors import AdapterServeError

if TYPE_CHECKING:
    from app.engine.slots import Admission

FinishReason = Literal["stop", "length", "timeout"]
RowOutput = Literal["probs", "embedding", "logprobs"]  # what a classification-lane row gives


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # logits processing (app/engine/logits.py); the defaults change nothing and cost nothing
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count so far
    repetition_penalty: float = 1.0  # HF's: prompt and generated tokens' logits divided (>0) / multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # end-of-sequence tokens are refused before this many tokens
    grammar: str | None = None  # an llguidance grammar (structured output; app/engine/grammar.py)
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the top k


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's distribution and the most likely tokens
    (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Flow:
    """Whose work this is, for fair admission (app/engine/fair_queue.py): the tenant and its
    scheduling weight, the adapter (or composition) it runs, and its priority within the tenant
    (lower first, as vLLM's ``priority``)."""

    tenant: str = "default"
    weight: float = 1.0
    adapter: str = ""  # "" = the bare base
    priority: int = 0
    queue_share: float = 1.0  # the fraction of MAX_QUEUE its tenant's waiting work may fill


ONE_FLOW = Flow()  # all work when nobody is told apart


@dataclass(eq=False)
class ClassifyWork:
    """Inputs for one forward each (no KV cache), and what each gives (``output``): a
    classification adapter's probabilities; the pooled embedding of an embedding adapter or the
    bare base (``adapter`` None); or each token's log-probability after the ones before it under
    a generation adapter or the bare base (a :class:`TokenLogprob` per token but the first, with
    its ``top`` most likely alternatives)."""

    adapter: AdapterVersion | None
    weights: Adapter | None  # held until the work is done: host eviction cannot take them away
    inputs: list[list[int]]  # token ids per input text
    flow: Flow = ONE_FLOW
    deadline: float = float("inf")  # time.monotonic() after which it fails with 504
    future: Future[list[Any]] = field(default_factory=Future)
    cancelled: bool = False
    # token attributions asked for (app/engine/explain.py): the spec, each input's special tokens,
    # and the explanations, set before the future's result
    explain: ExplainSpec | None = None
    special: list[list[bool]] | None = None
    explanations: list[Explanation] | None = None
    output: RowOutput = "probs"
    top: int = 0  # logprobs: alternatives per token

    @property
    def cost(self) -> int:
        """Its tokens (what fair admission charges its flow; an explanation's path rows count)."""
        tokens = sum(len(ids) for ids in self.inputs)
        return tokens * (1 + self.explain.steps) if self.explain is not None else tokens


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason  # "timeout": cut off by the request deadline after these tokens
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token when the request asked for them
    cached_tokens: int = 0  # of the prompt's tokens, those taken from the prefix cache


@dataclass(frozen=True)
class StreamDelta:
    """New text of a streamed generation; the last one carries the result (or the error)."""

    text: str
    result: GenerationResult | None = None
    error: AdapterServeError | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last delta (when asked)


StreamSink = Callable[[StreamDelta], None]


@dataclass(frozen=True)
class Member:
    """The adapter of a generation's row and its weight in an ensemble's mean (the bare base: no
    version and no weights)."""

    version: AdapterVersion | None
    weights: Adapter | None  # set exactly when ``version`` is
    weight: float = 1.0

    @property
    def uid(self) -> int | None:
        """Its version's uid (the prefix cache's key), None for the bare base."""
        return self.version.uid if self.version is not None else None


BASE_ROW = Member(None, None)


@dataclass(frozen=True)
class Generation:
    """One checked, tokenized generation: the record the serving layer hands the engine
    (:meth:`app.engine.engine.Engine.submit`). Exactly one of: no adapter (the bare base), one
    ``adapter``, or an ensemble's ``members``."""

    prompt: list[int]
    params: SamplingParams
    adapter: Member | None = None  # one adapter (or a merged one) for the row
    # ensemble generation: one row per member, each token sampled from their weighted mean
    # distribution and fed to every member's row
    members: tuple[Member, ...] = ()
    label: str | None = None  # a composition's name for metrics (else the adapter's)
    flow: Flow = ONE_FLOW

    def __post_init__(self) -> None:
        assert not (self.adapter and self.members), "one adapter or an ensemble's members"


@dataclass(eq=False)
class GenerateWork:
    """A generation in the engine: its request and what the engine thread records while it runs.
    Only the engine thread writes it once queued (the API side sends :class:`Abort`)."""

    request: Generation
    sink: StreamSink | None = None  # thread-safe; set for streamed requests
    deadline: float = float("inf")  # time.monotonic(): then it ends with the tokens it has (or 504)
    future: Future[GenerationResult] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # its client went away (Abort), or its deadline passed in a prefill
    first_token_at: float | None = None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def flow(self) -> Flow:
        return self.request.flow

    @property
    def cost(self) -> int:
        """Its prompt and the most tokens it may generate (what fair admission charges its flow)."""
        return len(self.request.prompt) + self.request.params.max_new_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def members(self) -> tuple[Member, ...]:
        return self.request.members

    @property
    def uids(self) -> list[int]:
        """The adapter versions its rows need in device slots."""
        return [m.version.uid for m in self.rows if m.version is not None]

    @property
    def rows(self) -> list[Member]:
        """Its rows' (adapter, weights, weight in the mean): one, or one per ensemble member."""
        if self.request.members:
            return list(self.request.members)
        return [self.request.adapter or BASE_ROW]

    @property
    def metric_name(self) -> str | None:
        version = self.request.adapter.version if self.request.adapter else None
        return self.request.label or (version.name if version else None)


# --- commands: changes to engine state, applied between forwards ------------------------------
@dataclass
class LoadAdapter:
    """Bring a version into a device slot now (preloading)."""

    version: AdapterVersion
    weights: Adapter
    future: Future[None] = field(default_factory=Future)


@dataclass
class PinAdapter:
    """Load a version and keep every resident version of its name from eviction; on failure
    (no slot can be freed) nothing changes."""

    version: AdapterVersion
    weights: Adapter
    future: Future[None] = field(default_factory=Future)


@dataclass
class UnpinAdapter:
    name: str
    future: Future[None] = field(default_factory=Future)


@dataclass
class RetireAdapter:
    """A replaced or deleted version: its slot is freed once no queued or running work uses it."""

    uid: int
    future: Future[None] = field(default_factory=Future)


@dataclass
class Abort:
    """The API side gave up on a work item (its client went away, or its future timed out): the
    engine drops its rows at the next step."""

    work: ClassifyWork | GenerateWork
    future: Future[None] = field(default_factory=Future)


@dataclass
class CutOffAll:
    """Shutting down: end every request now, running ones with the tokens they have."""

    future: Future[None] = field(default_factory=Future)


Command = LoadAdapter | PinAdapter | UnpinAdapter | RetireAdapter | Abort | CutOffAll
Work = ClassifyWork | GenerateWork


class Lane(Protocol):
    """What the engine loop needs of a lane (classification and generation have the same shape)."""

    def busy(self) -> bool: ...

    def queued(self) -> int: ...

    def step(self, admission: Admission) -> None: ...

    def works(self) -> list[ClassifyWork] | list[GenerateWork]: ...

    def queued_uids(self) -> set[int]: ...

    def resident_uids(self) -> set[int]: ...

    def expire(self, now: float, error: AdapterServeError | None = None) -> None: ...

    def fail_all(self, exc: AdapterServeError) -> None: ...
