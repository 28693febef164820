"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole output.

As TGI does (``prefix_offset`` / ``read_offset``): the text of the tokens after ``prefix`` is
decoded with and without the new tokens, and the difference is the new text. Tokens that end
inside a multi-byte character (the decode ends in U+FFFD) are held back until it completes, so
the text only ever grows by complete characters. Decoding the window from ``prefix`` (not from the
new token alone) keeps tokenizers that render a token differently by its left neighbour exact.
"""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The text of a growing token list; :meth:`add` returns the text each token adds."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text is already in ``text``

    def add(self, token: int) -> str:
        self.tokens.append(token)
        window = self.tokens[self._prefix :]
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(window)
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""  # nothing complete yet
        delta = after[len(before) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self.tokens)
        return delta

    def flush(self) -> str:
        """At the end: add whatever the held-back tokens decode to (even an incomplete character),
        so that :attr:`text` equals a decode of all tokens."""
        if self._read == len(self.tokens):
            return ""
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        delta = after[len(before) :] if after.startswith(before) else ""
        self.text += delta
        self._prefix = self._read = len(self.tokens)
        return delta
