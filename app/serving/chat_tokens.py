"""Chat prompts tokenized piece by piece: a conversation's earlier turns are not tokenized again.

A chatbot resends its whole conversation at every turn, and the chat template renders it as the
same text as before plus the new turn. A fast tokenizer splits its input at its special tokens
(``<|im_start|>``, ``<|im_end|>``, ...) before anything else and tokenizes each piece between them
on its own; so the prompt's tokens are the concatenation of its pieces' tokens, and the pieces of
the earlier turns (each message's text) are kept here, least recently used first out. A ~1,100-token
conversation costs ~2 ms to tokenize whole on 2 cores; its next turn here, only the new message.

Tokenizers where a piece tokenized alone differs from the same piece inside the text (special
tokens that strip the whitespace around them, a SentencePiece prefix only at the start of the text)
are found by a probe when the tokenizer is first used, and keep tokenizing whole texts.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any

PIECES = 4096  # pieces kept (a message's text is a piece)
PROBE = [  # texts with what could tell pieces from whole texts apart: spaces, newlines, digits, non-ASCII
    {"role": "system", "content": "  You are helpful.\n\n"},
    {"role": "user", "content": " Hello there!  12345 ümlaut 漢字\n"},
    {"role": "assistant", "content": "Hi.\n - first\n\tsecond "},
    {"role": "user", "content": "again"},
]


class ChatTokens:
    """``tokenize(text)`` = ``tokenizer(text, add_special_tokens=False)["input_ids"]``, piece by
    piece where the tokenizer allows it (thread-safe: long prompts are tokenized off the event loop)."""

    def __init__(self, tokenizer: Any, pieces: int = PIECES) -> None:
        self.tokenizer = tokenizer
        self.pieces = pieces
        self._kept: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._split: re.Pattern[str] | None = None
        self._checked = False

    def _whole(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def __call__(self, text: str) -> list[int]:
        if not self._checked:
            self._split = self._splitter()
            self._checked = True
        if self._split is None:
            return self._whole(text)
        return self._by_pieces(self._split, text)

    def _by_pieces(self, split: re.Pattern[str], text: str) -> list[int]:
        out: list[int] = []
        for piece in split.split(text):
            if not piece:
                continue
            with self._lock:
                ids = self._kept.get(piece)
                if ids is not None:
                    self._kept.move_to_end(piece)
            if ids is None:
                ids = self._whole(piece)
                with self._lock:
                    self._kept[piece] = ids
                    while len(self._kept) > self.pieces:
                        self._kept.popitem(last=False)
            out.extend(ids)
        return out

    def _splitter(self) -> re.Pattern[str] | None:
        """The special tokens' pattern (kept in the split), when this tokenizer's pieces tokenize
        alone as they do in the text (the probe); else None."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None)
        if not decoder or not getattr(self.tokenizer, "is_fast", False):
            return None
        flags = ("lstrip", "rstrip", "single_word", "normalized")  # (each changes what is around it)
        plain = [
            str(token.content)
            for token in decoder.values()
            if getattr(token, "special", False) and not any(getattr(token, flag, False) for flag in flags)
        ]
        if not plain:
            return None
        split = re.compile("(" + "|".join(re.escape(t) for t in sorted(plain, key=len, reverse=True)) + ")")
        try:
            texts = [str(self.tokenizer.apply_chat_template(PROBE[:n], tokenize=False)) for n in (2, 4)]
        except Exception:  # (no chat template, or one that rejects the probe)
            return None
        for text in texts:
            pieces = [p for p in split.split(text) if p]
            if sum(len(self._whole(p)) for p in pieces) == 0 or [
                i for p in pieces for i in self._whole(p)
            ] != self._whole(text):
                return None
        return split
