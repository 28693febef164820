"""Training data: read CSV/JSONL files, check them, split them, tokenize them.

Everything here is plain data and the tokenizer; no model. Every problem with the data raises
:class:`DataError` with a message that names the file, the row and what to do.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase


class DataError(ValueError):
    """The training data cannot be used as given."""


Record = dict[str, Any]


def read_records(path: Path) -> list[Record]:
    """Rows of a ``.csv`` (header line) or ``.jsonl`` (one JSON object per line) file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise DataError(f"{path}: the file is empty (a CSV needs a header line and rows)")
        rows: list[Record] = [dict(row) for row in reader]
    elif suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(obj)
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .csv or .jsonl")
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def _need_columns(path: Path, rows: list[Record], columns: list[str], what: str) -> None:
    present = set().union(*(r.keys() for r in rows))
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} for {what}; the file has "
            f"{', '.join(map(repr, sorted(present))) or 'none'} (choose others with the column options)"
        )


def _text(path: Path, row_no: int, row: Record, column: str) -> str:
    value = row.get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: row {row_no}: column {column!r} is empty or not text")
    return value


# --- classification -------------------------------------------------------------------------


@dataclass
class ClassifyExamples:
    texts: list[str]
    labels: list[str]


def classify_examples(path: Path, text_column: str, label_column: str) -> ClassifyExamples:
    rows = read_records(path)
    _need_columns(path, rows, [text_column, label_column], "classification")
    texts, labels = [], []
    for i, row in enumerate(rows, 1):
        texts.append(_text(path, i, row, text_column))
        labels.append(_text(path, i, row, label_column).strip())
    return ClassifyExamples(texts, labels)


def label_set(train: ClassifyExamples, val: ClassifyExamples | None, source: Path) -> list[str]:
    """The sorted class names; at least two, and every validation label seen in training."""
    labels = sorted(set(train.labels))
    if len(labels) < 2:
        raise DataError(
            f"{source}: a classifier needs at least two classes; every row has label {labels[0]!r}"
        )
    if val is not None:
        unknown = sorted(set(val.labels) - set(labels))
        if unknown:
            raise DataError(
                f"the validation data has labels that the training data does not: "
                f"{', '.join(map(repr, unknown))}"
            )
    return labels


def stratified_split(
    data: ClassifyExamples, fraction: float, seed: int
) -> tuple[ClassifyExamples, ClassifyExamples]:
    """Hold out ``fraction`` of each class (at least one row of classes with two or more rows)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        k = round(len(idx) * fraction)
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.update(idx[:k])
    train = [i for i in range(len(data.texts)) if i not in held]
    val = sorted(held)
    return (
        ClassifyExamples([data.texts[i] for i in train], [data.labels[i] for i in train]),
        ClassifyExamples([data.texts[i] for i in val], [data.labels[i] for i in val]),
    )


# --- generation -----------------------------------------------------------------------------


def chat_examples(
    path: Path, prompt_column: str, response_column: str, messages_column: str, system: str | None
) -> list[list[dict[str, str]]]:
    """Conversations: from a ``messages`` column (chat format), else ``prompt``/``response`` pairs."""
    rows = read_records(path)
    present = set().union(*(r.keys() for r in rows))
    if messages_column in present:
        convs = [_messages(path, i, row.get(messages_column)) for i, row in enumerate(rows, 1)]
    else:
        _need_columns(path, rows, [prompt_column, response_column], "generation (or a messages column)")
        convs = [
            [
                {"role": "user", "content": _text(path, i, row, prompt_column)},
                {"role": "assistant", "content": _text(path, i, row, response_column)},
            ]
            for i, row in enumerate(rows, 1)
        ]
    if system:
        convs = [
            c if c[0]["role"] == "system" else [{"role": "system", "content": system}, *c] for c in convs
        ]
    return convs


def _messages(path: Path, row_no: int, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: row {row_no}: messages is not a JSON list ({exc.msg})") from exc
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}: row {row_no}: messages must be a non-empty list")
    out = []
    for m in value:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{path}: row {row_no}: each message needs a role (system, user or assistant) "
                "and text content"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{path}: row {row_no}: no assistant message to learn from")
    return out


def random_split(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    k = round(len(items) * fraction)
    if fraction > 0 and len(items) >= 2:
        k = min(max(k, 1), len(items) - 1)
    held = set(idx[:k])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


# --- tokenization ---------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids per example; ``targets`` is the class id (classify) or per-token labels (generate,
    -100 where no loss is taken)."""

    input_ids: list[list[int]] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # examples left with nothing to learn after the cut


def encode_classify(
    tok: PreTrainedTokenizerBase, data: ClassifyExamples, labels: list[str], max_length: int
) -> Encoded:
    index = {name: i for i, name in enumerate(labels)}
    enc = Encoded()
    for text, label in zip(data.texts, data.labels, strict=True):
        ids: list[int] = tok(text)["input_ids"]
        if len(ids) > max_length:
            ids = ids[:max_length]
            enc.truncated += 1
        enc.input_ids.append(ids)
        enc.targets.append(index[label])
    return enc


def _template_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    ids: list[int] = tok(str(text), add_special_tokens=False)["input_ids"]
    return ids


def encode_chat(tok: PreTrainedTokenizerBase, convs: list[list[dict[str, str]]], max_length: int) -> Encoded:
    """Tokenize conversations with the chat template; the loss covers the assistant turns only
    (the tokens the server will be asked to generate, end-of-turn included)."""
    if not getattr(tok, "chat_template", None):
        raise DataError("the base model's tokenizer has no chat template; generation training needs one")
    enc = Encoded()
    for conv in convs:
        ids = _template_ids(tok, conv, prompt=False)
        labels = [-100] * len(ids)
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            start = len(_template_ids(tok, conv[:i], prompt=True))
            end = len(_template_ids(tok, conv[: i + 1], prompt=False))
            labels[start:end] = ids[start:end]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            enc.truncated += 1
        if all(t == -100 for t in labels):
            enc.dropped += 1
            continue
        enc.input_ids.append(ids)
        enc.targets.append(labels)
    return enc


def label_counts(labels: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))
