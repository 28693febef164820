"""How a classification batch's rows are split into forwards of similar lengths."""

from __future__ import annotations

import random

from app.engine.runner import length_groups


def test_every_row_once_and_padding_bounded() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
        groups = length_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            widths = [lengths[i] for i in g]
            assert widths == sorted(widths)  # a group is a run of the length-sorted rows
            padded, real = len(g) * max(widths), sum(widths)
            # a group stops growing at 8 rows once the next row would pad it beyond 1.25x
            assert len(g) <= 8 or padded <= 1.25 * real


def test_equal_lengths_make_one_forward() -> None:
    assert length_groups([12] * 64) == [list(range(64))]
    assert length_groups([]) == []


def test_short_and_long_rows_run_apart() -> None:
    lengths = [10] * 16 + [200] * 16
    groups = length_groups(lengths)
    assert [sorted(g) for g in groups] == [list(range(16)), list(range(16, 32))]
