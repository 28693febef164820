"""``POST /classify`` with ``explain``: token attributions of each input's label (docs/explain.md).

Inputs are tokenized with character offsets; each target (one adapter, a merged composition, or
every member of an ensemble) is explained by the engine (app/engine/explain.py). An ensemble
explains the label it predicts (or the one asked for) with each member, and its scores and delta
are the members' weighted mean, with the ensemble's weights: each member's scores explain its own
logit of that label, so the mean explains the weighted mean of the members' logits, which is what
``combine: logits`` ranks and what ``mean`` and ``vote`` follow closely.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from app.adapters.records import Target
from app.config import Settings
from app.engine.engine import Engine
from app.engine.explain import ExplainSpec, Explanation
from app.engine.types import ClassifyWork, Flow
from app.errors import ExplainRefused, InvalidRequest
from app.protocol.native import ClassifyResult, ExplainOptions, TokenAttribution


@dataclass(frozen=True)
class Encoded:
    """One input's tokens with where they come from in its text."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]
    pieces: list[str]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    """``text``'s token ids (as /classify encodes them) with character offsets and special flags."""
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    special = [bool(m) for m in enc["special_tokens_mask"]]
    pieces = [
        str(tokenizer.convert_ids_to_tokens(tok)) if is_special else text[a:b]
        for tok, (a, b), is_special in zip(ids, offsets, special, strict=True)
    ]
    return Encoded(ids, offsets, special, pieces)


def check(options: ExplainOptions, encoded: Sequence[Encoded], settings: Settings) -> None:
    """Refuse (400) a path beyond the limits (steps × tokens)."""
    steps = options.steps if options.method == "integrated_gradients" else 1
    longest = max(len(e.ids) for e in encoded)
    if steps * longest > settings.explain_max_path_tokens:
        raise ExplainRefused(
            f"explain: {steps} steps × {longest} tokens = {steps * longest} path tokens; the limit is "
            f"{settings.explain_max_path_tokens} (EXPLAIN_MAX_PATH_TOKENS): fewer steps or a shorter input",
            param="explain.steps",
        )


async def explain_target(
    engine: Engine,
    target: Target,
    encoded: Sequence[Encoded],
    options: ExplainOptions,
    results: list[ClassifyResult],
    flow: Flow,
) -> None:
    """Attach each result's attributions: its label (or ``options.target``) explained by every
    member of ``target``, combined with the members' weights."""
    members = target.members
    labels = list(members[0].record.labels or [])
    wanted = options.target
    if wanted is not None and wanted not in labels:
        raise InvalidRequest(
            f"explain.target: {wanted!r} is not one of the labels {labels}", param="explain.target"
        )
    steps = options.steps if options.method == "integrated_gradients" else 1

    async def one(member: int, i: int) -> Explanation:
        handle = members[member].record
        label = wanted if wanted is not None else results[i].label
        index = list(handle.labels or []).index(label)
        spec = ExplainSpec(options.method, steps, index)
        e = encoded[i]
        work = ClassifyWork(
            handle.handle, members[member].weights, [e.ids], flow, explain=spec, special=[e.special]
        )
        await engine.run(work)
        assert work.explanations is not None
        (out,) = work.explanations
        return out

    found = await asyncio.gather(*(one(m, i) for m in range(len(members)) for i in range(len(encoded))))
    weights = [h.weight for h in members] if target.ensemble else [1.0]
    total = sum(weights)
    for i, (result, e) in enumerate(zip(results, encoded, strict=True)):
        each = [found[m * len(encoded) + i] for m in range(len(members))]
        scores = [
            sum(w * x.scores[t] for w, x in zip(weights, each, strict=True)) / total
            for t in range(len(e.ids))
        ]
        deltas = [x.delta for x in each]
        result.explained = wanted if wanted is not None else result.label
        result.attributions = [
            TokenAttribution(token=piece, start=a, end=b, score=score, special=special)
            for piece, (a, b), score, special in zip(e.pieces, e.offsets, scores, e.special, strict=True)
        ]
        if all(d is not None for d in deltas):
            result.delta = sum(w * d for w, d in zip(weights, deltas, strict=True) if d is not None) / total
