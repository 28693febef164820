"""Accuracy and macro-F1 of a served classification adapter (or an ensemble) on a labelled CSV,
through HTTP.

    python scripts/eval_classifier.py --url http://127.0.0.1:8000 --adapter NAME --data test.csv
    python scripts/eval_classifier.py --adapter a,b --combine mean --data all.csv --held-out 0.2

The CSV has `text` and `label` columns (as `adapterserve train` reads them); `--held-out F` scores
only the split that `adapterserve train --val-fraction F` (seed 0) held out of the same file. Also
printed: the majority-class baseline on the same rows. A comma-separated `--adapter` is an ensemble.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter

import httpx


def macro_f1(pred: list[str], gold: list[str], labels: list[str]) -> float:
    scores = []
    for c in labels:
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(pred, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(pred, gold, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--combine", default="mean", choices=["mean", "vote", "logits"])
    parser.add_argument("--held-out", type=float, default=None, help="the trainer's validation fraction")
    args = parser.parse_args()
    with open(args.data, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    if args.held_out:
        from pathlib import Path

        from app.training.data import classify_examples, stratified_split

        data = classify_examples(Path(args.data), "text", "label")  # as the trainer read it
        held = stratified_split(data, args.held_out, seed=0)[1]
        texts, gold = held.texts, held.labels
    names = args.adapter.split(",")
    target = {"adapter": names[0]} if len(names) == 1 else {"adapters": names, "combine": args.combine}
    pred: list[str] = []
    with httpx.Client(base_url=args.url, timeout=600) as http:
        for i in range(0, len(texts), args.batch):
            resp = http.post("/classify", json={**target, "inputs": texts[i : i + args.batch]})
            resp.raise_for_status()
            pred += [r["label"] for r in resp.json()["results"]]
    labels = sorted(set(gold))
    majority = Counter(gold).most_common(1)[0][0]
    acc = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    base_acc = gold.count(majority) / len(gold)
    print(f"{args.adapter} on {args.data}: {len(gold)} texts")
    print(f"accuracy {acc:.3f}, macro-F1 {macro_f1(pred, gold, labels):.3f}")
    print(
        f"majority class ({majority}): accuracy {base_acc:.3f}, "
        f"macro-F1 {macro_f1([majority] * len(gold), gold, labels):.3f}"
    )


if __name__ == "__main__":
    main()
