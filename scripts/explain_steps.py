"""How integrated gradients converge on the demo classifiers: the convergence delta against the
number of Gauss-Legendre points, on held-out texts, through a server on the demo store.

    python scripts/explain_steps.py [--texts 10] [--steps 8,16,32,64,128,256] [--adapters a,b]

For each classifier: the median |delta| and the median |delta| / |logit(x) − logit(baseline)| (the
share of the logit's change the scores leave unexplained), over ``--texts`` held-out texts (the
trainer's split, cut to its --max-length), each explained for its predicted label; and the time
of one explained request at each step count against a plain one. Needs ``make demo-data``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from bench.common import machine_line
from bench.server import running_server
from scripts.eval_quantization import CLASSIFIERS, _held_out

# a classifier of another base: ADAPTERSERVE_BASE_MODEL=all-minilm-l6-v2 ... --adapters drug-review-sentiment
EXTRA = {"drug-review-sentiment": ("data/drug-reviews-test.csv", 120)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=10)
    parser.add_argument("--steps", default="8,16,32,64,128,256")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--adapters", default="bbc-topic,chat-topic,chat-topic-bottleneck")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    with running_server("adapters_store", quantization=args.quantization) as (_, url):
        http = httpx.Client(base_url=url, timeout=600)
        data = {**CLASSIFIERS, **EXTRA}
        for adapter in args.adapters.split(","):
            path, max_length = data[adapter]
            texts = _held_out(path, max_length)[0][: args.texts]
            plain = []
            for text in texts:
                start = time.perf_counter()
                http.post("/classify", json={"adapter": adapter, "inputs": text}).raise_for_status()
                plain.append(time.perf_counter() - start)
            cells = []
            for n in steps:
                deltas, shares, took = [], [], []
                for text in texts:
                    body = {"adapter": adapter, "inputs": text, "explain": {"steps": n}}
                    start = time.perf_counter()
                    resp = http.post("/classify", json=body)
                    took.append(time.perf_counter() - start)
                    resp.raise_for_status()
                    result = resp.json()["results"][0]
                    total = sum(a["score"] for a in result["attributions"])
                    change = total - result["delta"]  # logit(x) - logit(baseline)
                    deltas.append(abs(result["delta"]))
                    shares.append(abs(result["delta"]) / max(abs(change), 1e-9))
                cells.append(
                    f"{statistics.median(deltas):.3f} ({statistics.median(shares):.0%}), "
                    f"{statistics.median(took) / statistics.median(plain):.0f}x"
                )
            rows.append((adapter, cells))
    print(machine_line())
    print(
        f"quantization {args.quantization}; median over {args.texts} held-out texts of |delta| (its share of "
        "|logit(x) - logit(baseline)|), and an explained request's time against a plain one\n"
    )
    print("| classifier | " + " | ".join(f"{n} steps" for n in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for adapter, cells in rows:
        print(f"| `{adapter}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
