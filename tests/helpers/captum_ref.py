"""Captum's attributions on ``inputs_embeds`` of a reference model, as adapterserve computes them
(the pad token's embedding as the baseline except at special tokens; Gauss-Legendre points)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr import InputXGradient, IntegratedGradients


def _baseline(tok: Any, ids: torch.Tensor) -> torch.Tensor:
    special = torch.tensor(tok.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True))
    return torch.where(
        special.bool(), ids[0], tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ).unsqueeze(0)


def captum_scores(
    forward: Callable[[torch.Tensor], torch.Tensor],
    embed: Any,
    tok: Any,
    text: str,
    target: int,
    method: str,
    steps: int,
) -> tuple[list[float], float | None]:
    ids = tok(text, return_tensors="pt").input_ids
    x = embed(ids).detach()
    if method == "gradient_x_input":
        attr = InputXGradient(forward).attribute(x, target=target)
        return attr.sum(-1)[0].tolist(), None
    ig = IntegratedGradients(forward)
    attr, delta = ig.attribute(
        x,
        baselines=embed(_baseline(tok, ids)).detach(),
        target=target,
        n_steps=steps,
        method="gausslegendre",
        return_convergence_delta=True,
    )
    return attr.sum(-1)[0].tolist(), float(delta[0])


def assert_close(served: dict[str, Any], scores: list[float], delta: float | None) -> None:
    got = [a["score"] for a in served["attributions"]]
    assert len(got) == len(scores)
    scale = max(abs(s) for s in scores)
    assert max(abs(a - b) for a, b in zip(got, scores, strict=True)) <= 1e-3 * scale, (got, scores)
    if delta is None:
        assert "delta" not in served
    else:
        # delta = logit(x) - logit(baseline) - Σ scores: the tokens' errors add up in it
        total = sum(abs(s) for s in scores)
        assert abs(served["delta"] - delta) <= 1e-3 * total + 1e-4, (served["delta"], delta, total)
