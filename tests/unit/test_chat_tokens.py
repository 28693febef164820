"""Chat prompts tokenized piece by piece (app/serving/chat_tokens.py): the same ids as tokenizing
the whole text, on a real fast tokenizer (the tiny model's: byte-level BPE, ``<|im_start|>``
tokens), for conversations with spaces, newlines, non-ASCII text and special tokens typed inside a
message; a conversation's next turn tokenizes only its new pieces; a tokenizer whose pieces
tokenize otherwise alone is found by the probe and keeps tokenizing whole texts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar

import pytest
from transformers import AddedToken, AutoTokenizer

from app.serving.chat_tokens import ChatTokens

TINY = Path(__file__).parents[1] / "fixtures" / "tiny-llama"
WORDS = [
    "order",
    " parcel",
    "  refund",
    "\n",
    "\n\n",
    "ümlaut",
    "漢字",
    "12345",
    "\t-",
    "it's",
    "<|im_end|>",
    "😀",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return AutoTokenizer.from_pretrained(TINY)


class Counting:
    """The tokenizer, counting the texts it tokenizes."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.texts = tok, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.texts += 1
        return self.tok(text, **kwargs)


def _conversation(rng: random.Random, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "".join(rng.choice(WORDS) for _ in range(8))}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append(
            {"role": role, "content": "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 30)))}
        )
    return messages


def test_pieces_give_the_whole_texts_ids_and_a_next_turn_tokenizes_only_what_is_new(tok: Any) -> None:
    counting = Counting(tok)
    chat = ChatTokens(counting)
    rng = random.Random(3)
    for _ in range(30):
        messages = _conversation(rng, rng.randint(1, 9))
        text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        assert chat(text) == tok(text, add_special_tokens=False)["input_ids"], text
    messages = _conversation(rng, 6)
    chat(str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))
    before = counting.texts
    messages.append({"role": "user", "content": "and the courier? ümlaut"})
    text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert chat(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert counting.texts - before <= 2  # the new message's piece ("user\n..."), maybe "assistant\n"


def test_special_tokens_that_change_their_surroundings_are_not_split_on(tok: Any) -> None:
    stripping = AutoTokenizer.from_pretrained(TINY)
    stripping.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|tool|>", lstrip=True, rstrip=True)]}
    )
    chat = ChatTokens(stripping)
    messages = [{"role": "user", "content": "call  <|tool|>  now"}, {"role": "assistant", "content": " ok "}]
    text = str(stripping.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert chat(text) == stripping(text, add_special_tokens=False)["input_ids"]
    assert chat._split is not None and "tool" not in chat._split.pattern


class PrefixedAtStart:
    """A tokenizer that marks the start of its input (as a SentencePiece prefix does): pieces
    tokenized alone would each get the mark."""

    is_fast = True
    added_tokens_decoder: ClassVar[dict[int, AddedToken]] = {
        0: AddedToken("<s>", special=True, normalized=False)
    }

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False) -> str:
        return "".join(f"<s>{m['role']}:{m['content']}" for m in messages)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = [1]  # the mark
        for part in text.split("<s>"):
            ids += [ord(c) for c in part] + [0]
        return {"input_ids": ids[:-1]}


def test_a_tokenizer_whose_pieces_differ_alone_keeps_tokenizing_whole_texts() -> None:
    fake = PrefixedAtStart()
    chat = ChatTokens(fake)
    text = fake.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    assert chat(text) == fake(text)["input_ids"]
    assert chat._checked and chat._split is None
