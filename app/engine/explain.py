"""Token attributions of a classification: integrated gradients and gradient × input over the
input embeddings, computed on the engine thread as batched forward and backward passes.

Integrated gradients (Sundararajan et al. 2017, as Captum's ``IntegratedGradients`` computes it on
``inputs_embeds``): the path from a baseline ``b`` to the input's embeddings ``x`` is sampled at
Gauss-Legendre points ``α_k`` with weights ``w_k`` on [0, 1] (Captum's default method); the
attribution of an embedding dimension is ``(x - b) · Σ_k w_k ∂f/∂x(b + α_k (x - b))`` where ``f``
is the target label's logit, and a token's score is the sum over its dimensions. The baseline is
the pad token's embedding at every position except special tokens, which keep their own (a
zero baseline sits where RMSNorm and LayerNorm are discontinuous). ``delta`` is Captum's
convergence delta, ``Σ scores - (f(x) - f(b))``: how far the scores are from explaining the whole
change of the logit. Gradient × input is ``x · ∂f/∂x(x)`` (one backward, no baseline, no delta).

The interpolated rows run in chunks of at most ``chunk_tokens`` padded tokens (the activations a
backward pass keeps grow with them): an explanation advances one chunk per engine step, between the
plain batches of other requests. The model's weights stay frozen; only the input embeddings of a
chunk require gradients, and nothing of the graph outlives the chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch

Method = Literal["integrated_gradients", "gradient_x_input"]
# logits [rows, labels] of embedded rows: (embeddings [rows, tokens, dim], mask [rows, tokens]);
# the explainer's caller binds the slot, the head and the pooling
Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExplainSpec:
    method: Method
    steps: int  # integrated gradients: points on the path
    target: int  # the label's index


@dataclass(frozen=True)
class Explanation:
    """One input's attributions of its spec's target: a score per token and the convergence delta
    (integrated gradients only)."""

    scores: list[float]
    delta: float | None
    probs: list[float]  # the input's class probabilities


@cache
def gauss_legendre(steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Points and weights of the ``steps``-point Gauss-Legendre rule on [0, 1] (Captum's
    ``approximation_parameters("gausslegendre")``)."""
    x, w = np.polynomial.legendre.leggauss(steps)
    return tuple(float(a) for a in 0.5 * (x + 1)), tuple(float(b) for b in 0.5 * w)


def baseline_ids(ids: list[int], special: list[bool], pad_id: int) -> list[int]:
    """The baseline's tokens: the pad token where the input has an ordinary token."""
    return [tok if is_special else pad_id for tok, is_special in zip(ids, special, strict=True)]


def explain(
    logits: Logits,
    x: torch.Tensor,
    base: torch.Tensor,
    spec: ExplainSpec,
    chunk_tokens: int,
) -> Iterator[Explanation | None]:
    """Attribute the target logit of one input (``x``, ``base``: its embeddings and the baseline's,
    [tokens, dim]) to its tokens; yields None after each chunk of rows, then the explanation."""
    tokens = x.shape[0]
    mask = torch.ones(1, tokens, dtype=torch.long, device=x.device)
    with torch.no_grad():
        ends = logits(torch.stack([x, base]), mask.expand(2, -1)).float()
    yield None
    target = spec.target
    probs = torch.softmax(ends[0], -1).tolist()
    if spec.method == "gradient_x_input":
        grad = _gradients(logits, x.unsqueeze(0), mask, target, [1.0])
        yield Explanation((x.float() * grad).sum(-1).tolist(), None, probs)
        return
    alphas, weights = gauss_legendre(spec.steps)
    rows = max(1, chunk_tokens // tokens)
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    diff = x - base
    for start in range(0, spec.steps, rows):
        a = torch.tensor(alphas[start : start + rows], dtype=x.dtype, device=x.device)
        path = base.unsqueeze(0) + a.view(-1, 1, 1) * diff.unsqueeze(0)
        total += _gradients(logits, path, mask, target, list(weights[start : start + rows]))
        yield None
    scores = (diff.float() * total).sum(-1)
    delta = float(scores.sum() - (ends[0, target] - ends[1, target]))
    yield Explanation(scores.tolist(), delta, probs)


def _gradients(
    logits: Logits, rows: torch.Tensor, mask: torch.Tensor, target: int, weights: list[float]
) -> torch.Tensor:
    """``Σ_k weights[k] · ∂ logit_target / ∂ rows[k]`` [tokens, dim], in float32."""
    with torch.enable_grad():
        leaf = rows.detach().requires_grad_(True)
        out = logits(leaf, mask.expand(rows.shape[0], -1))[:, target]
        w = torch.tensor(weights, dtype=out.dtype, device=out.device)
        (grad,) = torch.autograd.grad((out * w).sum(), leaf)
    return grad.float().sum(0)
