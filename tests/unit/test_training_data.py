"""Pure parts of training: splits, batching, macro-F1, file reading."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.training.data import ClassifyExamples, DataError, random_split, read_records, stratified_split
from app.training.trainer import _batches, macro_f1


def test_stratified_split_holds_out_each_class() -> None:
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 2
    data = ClassifyExamples([f"t{i}" for i in range(len(labels))], labels)
    train, val = stratified_split(data, 0.2, seed=3)
    assert sorted(train.texts + val.texts) == sorted(data.texts)
    assert val.labels.count("a") == 10 and val.labels.count("b") == 2 and val.labels.count("c") == 1
    again_train, again_val = stratified_split(data, 0.2, seed=3)
    assert again_val.texts == val.texts and again_train.texts == train.texts


def test_random_split_keeps_at_least_one_row_each_side() -> None:
    train, val = random_split(list(range(3)), 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2 and sorted(train + val) == [0, 1, 2]
    assert random_split(list(range(5)), 0.0, seed=0) == (list(range(5)), [])


def test_batches_cover_every_example_once() -> None:
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    batches = list(_batches(lengths, 8, random.Random(0)))
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 8 for b in batches)


def test_macro_f1() -> None:
    assert macro_f1([0, 1, 2], [0, 1, 2], 3) == 1.0
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 0 -> 0
    assert macro_f1([0, 0], [0, 1], 2) == pytest.approx((2 / 3 + 0) / 2)


def test_read_records_formats(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("\ufefftext,label\nhello,x\n")
    assert read_records(tmp_path / "a.csv") == [{"text": "hello", "label": "x"}]
    (tmp_path / "b.jsonl").write_text('{"text": "hi", "label": 1}\n\n[1]\n')
    with pytest.raises(DataError, match=r"b.jsonl:3: each line must be a JSON object"):
        read_records(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.csv")
