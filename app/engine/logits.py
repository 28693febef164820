"""What a request changes in the next-token logits before sampling, and the log-probabilities it asks
for: OpenAI's presence and frequency penalties, the repetition penalty (as HF transformers defines
it), ``logit_bias``, ``min_tokens`` and the allowed-token mask of a grammar (structured output).

Each row that asks for any of these keeps a :class:`RowState` (its token counts, bias and grammar
matcher, updated by one token per step); a step stacks the states of those rows only and applies
each processor to all of them at once, so rows that ask for nothing cost nothing and no processor
loops over the vocabulary in Python. Log-probabilities are those of the model's own distribution
(before any processing, temperature or top-p), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from app.engine.types import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from llguidance import LLMatcher

log = logging.getLogger(__name__)


@dataclass
class RowState:
    """One request's processing state (only for rows whose parameters ask for processing)."""

    params: SamplingParams
    counts: torch.Tensor | None = None  # [vocab] generated-token counts (presence/frequency penalty)
    seen: torch.Tensor | None = None  # [vocab] bool: prompt or generated (repetition penalty)
    bias: torch.Tensor | None = None  # [vocab] additive logit bias
    matcher: LLMatcher | None = None  # the grammar's state (structured output)
    generated: int = 0

    @classmethod
    def of(
        cls, params: SamplingParams, prompt: list[int], vocab: int, device: torch.device, matcher: Any = None
    ) -> RowState | None:
        if not needs_processing(params):
            return None
        state = cls(params, matcher=matcher)
        if params.presence_penalty or params.frequency_penalty:
            state.counts = torch.zeros(vocab, device=device)
        if params.repetition_penalty != 1.0:
            state.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            state.seen[torch.tensor(prompt, dtype=torch.long, device=device).clamp(0, vocab - 1)] = True
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            state.bias = torch.zeros(vocab, device=device)
            state.bias[torch.tensor(ids, device=device)] = torch.tensor(values, device=device)
        return state

    def advance(self, token: int) -> bool:
        """Count ``token``; False when the grammar refuses it (the row then ends)."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.matcher is not None and not self.matcher.consume_token(token):
            log.warning("the grammar refused token %d: %s", token, self.matcher.get_error())
            return False
        return True

    @property
    def grammar_done(self) -> bool:
        """The grammar has ended (its end token was taken, or it allows nothing more)."""
        return self.matcher is not None and self.matcher.is_stopped()


def needs_processing(p: SamplingParams) -> bool:
    return bool(
        p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or p.logit_bias
        or p.min_tokens
        or p.grammar is not None
    )


def process(logits: torch.Tensor, states: Sequence[RowState | None], eos_ids: Sequence[int]) -> torch.Tensor:
    """The logits [rows, vocab] the sampler chooses from (``logits`` itself when no row asks for
    processing): bias, then min_tokens, then penalties, then the grammar mask, as vLLM orders them."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    picked: list[RowState] = [s for s in states if s is not None]
    dev = logits.device
    every = len(rows) == logits.shape[0]  # (then the processed rows are the result: no copy back)
    index = torch.tensor(rows, device=dev)
    if every:
        sub = logits.float()
        sub = sub.clone() if sub is logits else sub
    else:
        sub = logits.index_select(0, index).float()

    def of(want: Any) -> tuple[torch.Tensor, list[RowState]]:
        local = [i for i, s in enumerate(picked) if want(s)]
        return torch.tensor(local, dtype=torch.long, device=dev), [picked[i] for i in local]

    at, group = of(lambda s: s.bias is not None)
    if group:
        sub[at] += torch.stack([s.bias for s in group])  # type: ignore[misc]
    at, group = of(lambda s: s.generated < s.params.min_tokens)
    if group and eos_ids:
        eos = torch.tensor(list(eos_ids), device=dev)
        sub[at.unsqueeze(1), eos.unsqueeze(0)] = float("-inf")
    at, group = of(lambda s: s.counts is not None)
    if group:
        counts = torch.stack([s.counts for s in group])  # type: ignore[misc]
        freq = torch.tensor([s.params.frequency_penalty for s in group], device=dev).unsqueeze(1)
        pres = torch.tensor([s.params.presence_penalty for s in group], device=dev).unsqueeze(1)
        sub[at] -= freq * counts + pres * (counts > 0).float()
    at, group = of(lambda s: s.seen is not None)
    if group:
        seen = torch.stack([s.seen for s in group])  # type: ignore[misc]
        penalty = torch.tensor([s.params.repetition_penalty for s in group], device=dev).unsqueeze(1)
        values = sub[at]
        scaled = torch.where(values > 0, values / penalty, values * penalty)
        sub[at] = torch.where(seen, scaled, values)
    at, group = of(lambda s: s.matcher is not None)
    if group:
        sub[at] = _masked(sub[at], [s.matcher for s in group])
        if eos_ids:  # a grammar that only allows EOS before min_tokens: end rather than fail the batch
            dead = ~torch.isfinite(sub).any(dim=-1)
            if bool(dead.any()):
                sub[dead.nonzero().unsqueeze(1), torch.tensor([eos_ids[0]], device=dev)] = 0.0
    if every:
        return sub
    out = logits.float().clone()
    out[index] = sub
    return out


def _masked(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """``logits`` [rows, vocab] with every token the rows' grammars do not allow at -inf."""
    import llguidance.torch

    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, i)
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(len(matchers), words * 32)[:, :vocab]
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def logprobs_of(
    logits: torch.Tensor, chosen: list[int], wants: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """Per row: the chosen token's log-probability under ``logits`` [rows, vocab] and the ``wants[i]``
    most likely tokens (None where a row asks for none); one batched log-softmax and top-k."""
    rows = [i for i, k in enumerate(wants) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(wants)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    lsm = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = torch.tensor([chosen[i] for i in rows], device=logits.device).unsqueeze(1)
    chosen_lp = lsm.gather(1, picked).squeeze(1).tolist()
    k = max(wants[i] or 0 for i in rows)
    top_v: list[list[float]] = [[] for _ in rows]
    top_i: list[list[int]] = [[] for _ in rows]
    if k:
        values, ids = lsm.topk(k, dim=-1)
        top_v, top_i = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        n = wants[i] or 0
        top = tuple(zip(top_i[j][:n], top_v[j][:n], strict=True))
        out[i] = TokenLogprob(chosen[i], chosen_lp[j], top)
    return out
