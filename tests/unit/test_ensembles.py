"""Combining ensemble members (pure logic) and the /classify request's ensemble form."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from app.adapters.composition import shared_labels
from app.errors import IncompatibleMembers
from app.protocol.native import ClassifyRequest
from app.serving.ensembles import combine

LABELS = ["a", "b", "c"]
ROWS = [{"a": 0.7, "b": 0.2, "c": 0.1}, {"a": 0.1, "b": 0.5, "c": 0.4}, {"a": 0.2, "b": 0.3, "c": 0.5}]


def test_mean_is_the_weighted_mean() -> None:
    label, scores = combine(ROWS, [2.0, 1.0, 1.0], LABELS, "mean")
    assert scores == pytest.approx({"a": 0.425, "b": 0.3, "c": 0.275}) and label == "a"


def test_logits_average_log_probabilities_then_softmax() -> None:
    label, scores = combine(ROWS, [1.0, 1.0, 1.0], LABELS, "logits")
    z = {lab: sum(math.log(r[lab]) for r in ROWS) / 3 for lab in LABELS}
    norm = sum(math.exp(v) for v in z.values())
    assert scores == pytest.approx({lab: math.exp(v) / norm for lab, v in z.items()})
    assert label == max(scores, key=scores.__getitem__)
    # a probability that underflowed to 0 does not break the combination
    _, scores = combine([{"a": 0.0, "b": 0.5, "c": 0.5}, ROWS[0]], [1.0, 1.0], LABELS, "logits")
    assert scores["a"] < 1e-20 and sum(scores.values()) == pytest.approx(1.0)


def test_vote_counts_weights_and_breaks_ties_by_the_mean() -> None:
    rows = [{"a": 0.6, "b": 0.3, "c": 0.1}, *ROWS[1:]]  # one vote each for a, b, c
    label, votes = combine(rows, [1.0, 1.0, 1.0], LABELS, "vote")
    assert votes == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert label == "b"  # the tie goes to the highest mean probability: a 0.30, b 0.37, c 0.33
    label, votes = combine(rows, [1.0, 3.0, 1.0], LABELS, "vote")
    assert label == "b" and votes["b"] == pytest.approx(0.6)


def test_label_sets_must_match_in_any_order() -> None:
    assert shared_labels([("x", ["a", "b"]), ("y", ["b", "a"])]) == ["a", "b"]
    with pytest.raises(IncompatibleMembers, match="'y' differs from 'x'"):
        shared_labels([("x", ["a", "b"]), ("y", ["a", "c"])])


def test_the_request_names_one_adapter_or_an_ensemble() -> None:
    req = ClassifyRequest.model_validate({"adapters": ["x", {"name": "y", "weight": 2.0}], "inputs": "t"})
    assert [(m.name, m.weight) for m in req.members] == [("x", 1.0), ("y", 2.0)] and req.target == "x+y"
    for bad in (
        {"inputs": "t"},
        {"adapter": "x", "adapters": ["y"], "inputs": "t"},
        {"adapters": [], "inputs": "t"},
        {"adapters": ["x", "x"], "inputs": "t"},
        {"adapters": [{"name": "x", "weight": -1.0}], "inputs": "t"},
        {"adapters": [f"a{i}" for i in range(9)], "inputs": "t"},
    ):
        with pytest.raises(ValidationError):
            ClassifyRequest.model_validate(bad)
