"""Classification ensembles: the members' class probabilities for one input, combined.

Every member of an ensemble runs as its own rows of the shared batch (one forward pass for all);
what comes back per member and input is a probability per label. Members must share one label set
(any order: aligned by name). The methods:

- ``mean``: the weighted mean of the probabilities;
- ``logits``: the weighted mean of the logits, then softmax. A member's logits are its
  log-probabilities up to one constant per row, which softmax cancels, so the log-probabilities
  stand in for them exactly;
- ``vote``: each member votes for its top label with its weight; ``scores`` are the labels' shares
  of the votes, and a tie goes to the label with the higher mean probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from app.adapters.composition import shared_labels
from app.adapters.methods import CombineMethod
from app.protocol.native import ClassifyResult, MemberResult

_TINY = 1e-45  # log of a probability that underflowed to 0


def combine(
    rows: Sequence[dict[str, float]], weights: Sequence[float], labels: Sequence[str], method: CombineMethod
) -> tuple[str, dict[str, float]]:
    """The ensemble's label and per-label scores from each member's probabilities for one input."""
    total = sum(weights)
    mean = {lab: sum(w * row[lab] for row, w in zip(rows, weights, strict=True)) / total for lab in labels}
    if method == "mean":
        scores = mean
    elif method == "logits":
        z = {
            lab: sum(w * math.log(max(row[lab], _TINY)) for row, w in zip(rows, weights, strict=True)) / total
            for lab in labels
        }
        top = max(z.values())
        exp = {lab: math.exp(v - top) for lab, v in z.items()}
        norm = sum(exp.values())
        scores = {lab: v / norm for lab, v in exp.items()}
    else:
        votes = dict.fromkeys(labels, 0.0)
        for row, w in zip(rows, weights, strict=True):
            votes[max(labels, key=lambda lab: row[lab])] += w / total
        winner = max(labels, key=lambda lab: (votes[lab], mean[lab]))
        return winner, votes
    return max(labels, key=lambda lab: scores[lab]), scores


def classification_results(
    members: Sequence[tuple[str, Sequence[str]]],
    probs: Sequence[Sequence[Sequence[float]]],
    weights: Sequence[float],
    method: CombineMethod,
    top_k: int | None,
    with_members: bool,
) -> list[ClassifyResult]:
    """Per input: the members' probabilities (``probs[member][input]``, in each member's label
    order) combined into one result; each member's own result too when asked."""
    labels = shared_labels(members)
    results = []
    for i in range(len(probs[0])):
        rows = [dict(zip(lab, p[i], strict=True)) for (_, lab), p in zip(members, probs, strict=True)]
        label, scores = combine(rows, weights, labels, method)
        each = (
            [
                MemberResult(adapter=name, **ranked(row, list(lab), top_k))
                for (name, lab), row in zip(members, rows, strict=True)
            ]
            if with_members
            else None
        )
        results.append(ClassifyResult(**ranked(scores, labels, top_k, label), members=each))
    return results


def ranked(
    scores: dict[str, float], labels: Sequence[str], top_k: int | None, label: str | None = None
) -> dict[str, Any]:
    """``label``, ``score`` and ``scores`` (best first, the ``top_k`` best) of one result; the label
    is the best score's unless given (a vote's winner)."""
    best = label if label is not None else max(labels, key=lambda lab: scores[lab])
    ranked = sorted(labels, key=lambda lab: (scores[lab], lab == best), reverse=True)
    if top_k is not None:
        ranked = ranked[:top_k]
    return {"label": best, "score": scores[best], "scores": {lab: scores[lab] for lab in ranked}}
