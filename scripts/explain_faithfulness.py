"""Are the attributions faithful? Delete the 20 % highest-attributed tokens of each held-out text and
see how much the predicted label's log-odds and probability drop, against deleting 20 % random tokens.

    PYTHONPATH=. python scripts/explain_faithfulness.py --adapter bbc-topic --data data/bbc-news.csv \\
        [--texts 40]
    ADAPTERSERVE_BASE_MODEL=all-minilm-l6-v2 PYTHONPATH=. python scripts/explain_faithfulness.py \\
        --adapter drug-review-sentiment --data data/drug-reviews-test.csv

Through a server on the demo store (the base from ``ADAPTERSERVE_BASE_MODEL``): each of ``--texts``
held-out texts (the trainer's split, cut to ``--max-length`` tokens) is classified with
``explain`` (each method), its ordinary tokens ranked by score, and the characters of the top 20 %
removed; the same number of random tokens is removed ``--draws`` times. Prints the mean drop of
the predicted label's log-odds, log(p / (1 - p)), for each, per method (the probability of a
confident classifier hardly moves: 0.99996 and 0.9996 are both "1.000"). Needs ``make demo-data``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from typing import Any

import httpx

from bench.common import machine_line
from bench.server import running_server
from scripts.eval_quantization import _held_out

METHODS = ("integrated_gradients", "gradient_x_input")


def without(text: str, tokens: list[dict[str, Any]]) -> str:
    """``text`` with the characters of ``tokens`` removed."""
    cut = sorted((t["start"], t["end"]) for t in tokens)
    out, at = [], 0
    for start, end in cut:
        out.append(text[at:start])
        at = max(at, end)
    return "".join(out) + text[at:]


def log_odds(scores: dict[str, float], label: str) -> float:
    """log(p / (1 - p)) of ``label``, with 1 - p summed from the other labels (no cancellation
    near p = 1, where a confident classifier's probability hardly moves)."""
    rest = sum(v for k, v in scores.items() if k != label)
    return math.log(max(scores[label], 1e-30)) - math.log(max(rest, 1e-30))


def measure(kind: str, scores: dict[str, float], label: str) -> float:
    """The label's log-odds or probability."""
    return log_odds(scores, label) if kind == "log-odds" else scores[label]


def label_scores(http: httpx.Client, adapter: str, texts: list[str]) -> list[dict[str, float]]:
    resp = http.post("/classify", json={"adapter": adapter, "inputs": texts})
    resp.raise_for_status()
    return [r["scores"] for r in resp.json()["results"]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    texts = [t for t in _held_out(args.data, args.max_length)[0] if t.strip()][: args.texts]
    rng = random.Random(0)
    # per method: the drops of the label's log-odds and of its probability, top and random deletions
    drops: dict[str, dict[str, tuple[list[float], list[float]]]] = {
        m: {"log-odds": ([], []), "probability": ([], [])} for m in args.methods
    }
    with running_server("adapters_store", quantization=args.quantization) as (_, url):
        http = httpx.Client(base_url=url, timeout=600)
        for text in texts:
            for method in args.methods:
                body = {
                    "adapter": args.adapter,
                    "inputs": text,
                    "explain": {"method": method, "steps": args.steps},
                }
                resp = http.post("/classify", json=body)
                resp.raise_for_status()
                result = resp.json()["results"][0]
                label, scores = result["label"], result["scores"]
                ordinary = [t for t in result["attributions"] if not t["special"] and t["token"].strip()]
                k = max(1, math.ceil(args.share * len(ordinary)))
                top = sorted(ordinary, key=lambda t: t["score"], reverse=True)[:k]
                randoms = [without(text, rng.sample(ordinary, k)) for _ in range(args.draws)]
                after = label_scores(http, args.adapter, [without(text, top), *randoms])
                for kind in ("log-odds", "probability"):
                    before, *rest = (measure(kind, x, label) for x in (scores, *after))
                    tops, rands = drops[method][kind]
                    tops.append(before - rest[0])
                    rands.append(before - statistics.mean(rest[1:]))
    print(machine_line())
    print(
        f"`{args.adapter}`, {len(texts)} held-out texts, quantization {args.quantization}: mean drop of "
        f"the predicted label's log-odds and probability after deleting {args.share:.0%} of the ordinary "
        "tokens\n"
    )
    print(
        "| method | drop of | highest-attributed deleted | random deleted (mean of draws) "
        "| texts where top > random |"
    )
    print("|---|---|---:|---:|---:|")
    for method, kinds in drops.items():
        for kind, (top_drops, random_drops) in kinds.items():
            wins = sum(a > b for a, b in zip(top_drops, random_drops, strict=True))
            cells = [
                f"{statistics.mean(top_drops):.4f}",
                f"{statistics.mean(random_drops):.4f}",
                f"{wins}/{len(texts)}",
            ]
            print(f"| {method} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
