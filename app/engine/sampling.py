"""Per-row token selection (greedy, temperature, top-p with a per-request seed) and stop strings."""

from __future__ import annotations

import torch

# below this temperature sampling is greedy (its limit); dividing logits by a tinier one overflows
MIN_TEMPERATURE = 1e-5


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of ``probs`` [vocab] outside the smallest set with mass >= top_p; renormalize."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_p, dim=-1)
    drop = cumulative - sorted_p >= top_p  # keep tokens until the mass before them reaches top_p
    drop[..., 0] = False  # the most likely token always stays (a tiny top_p rounds to 0 in float32)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum()


def select_tokens(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator]
) -> list[int]:
    """Pick one token per row of ``logits`` [batch, vocab]."""
    greedy = logits.argmax(dim=-1)
    chosen = greedy.tolist()
    for row, temp in enumerate(temperatures):
        if temp < MIN_TEMPERATURE:
            continue
        probs = torch.softmax(logits[row].float() / temp, dim=-1)
        probs = top_p_filter(probs, top_ps[row])
        chosen[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    return [int(t) for t in chosen]


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index where the earliest stop string starts in ``text`` (at ``start`` or later), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1
