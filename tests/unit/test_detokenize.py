"""Incremental detokenization against a full decode, with a toy byte-level tokenizer (no model)."""

from __future__ import annotations

import random

import pytest

from app.engine.detokenize import IncrementalDetokenizer


def decode(tokens: list[int]) -> str:
    """Tokens are bytes (as in byte-level BPE): a cut multi-byte character decodes to U+FFFD."""
    return bytes(tokens).decode("utf-8", errors="replace")


TEXTS = ["plain ascii text", "héllo wörld", "价格 🙂 ok", "🙂🙂🙂", "a\nb\tc"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode_and_grows_by_whole_characters(text: str) -> None:
    tokens = list(text.encode())
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.add(t) for t in tokens]
    assert "".join(deltas) == detok.text == text == decode(tokens)
    assert all("\ufffd" not in d for d in deltas)


def test_an_unfinished_character_is_held_back_then_flushed() -> None:
    tokens = list("ok 🙂".encode())[:-1]  # the emoji cut short
    detok = IncrementalDetokenizer(decode)
    for t in tokens:
        detok.add(t)
    assert detok.text == "ok "
    assert detok.flush() == "\ufffd" and detok.text == decode(tokens)
    assert detok.flush() == ""


def test_each_step_decodes_a_bounded_window() -> None:
    lengths: list[int] = []

    def counting(tokens: list[int]) -> str:
        lengths.append(len(tokens))
        return decode(tokens)

    detok = IncrementalDetokenizer(counting)
    rng = random.Random(0)
    for _ in range(2000):
        detok.add(rng.randrange(32, 127))
    assert max(lengths) <= 2  # O(1) per token, not the whole output
    assert len(detok.text) == 2000
