"""Structured output: JSON schemas and regular expressions as grammars for llguidance.

llguidance was chosen by measurement (``python -m bench.grammar_engines``; docs/decoding.md): it reads
the base's own Hugging Face tokenizer (no vocabulary conversion), compiles a schema in milliseconds,
computes a row's allowed-token mask in tens of microseconds, and has no dependencies. The API side
compiles and checks a request's grammar here (a bad schema is a 400 before anything is queued); the
engine makes one matcher per row from the grammar text and applies its mask in the batched sampler
(:mod:`app.engine.logits`).
"""

from __future__ import annotations

import json
import threading
from functools import cached_property
from typing import Any

import llguidance
import llguidance.hf
from transformers import PreTrainedTokenizerBase

from app.errors import InvalidRequest

# compact JSON as json.dumps writes it: flexible whitespace lets a model pad forever
_COMPACT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """The base's tokenizer as llguidance sees it (built once, on first use: about a second) and the
    grammars and matchers made with it; also each token's bytes (for log-probabilities)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab: int, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()

    @cached_property
    def _ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab, eos_token=self.eos_ids)  # type: ignore[arg-type]

    def prepare(self) -> None:
        """Build the tokenizer now (called off the event loop before the first grammar)."""
        _ = self._ll, self.token_bytes

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Every token id's bytes (special tokens: their text)."""
        ll = self._ll
        return [ll.decode_bytes([i]) for i in range(self.vocab)]

    # --- grammars (API side) ------------------------------------------------------------------
    def json_schema(self, schema: dict[str, Any] | None, param: str) -> str:
        """The grammar of JSON documents valid against ``schema`` (None: any JSON object)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema if schema is not None else {"type": "object"},
                defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
            )
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"the JSON schema cannot be used: {exc}", param=param) from exc
        return self._checked(grammar, param)

    def call_or_text(self, call: dict[str, Any], param: str) -> str:
        """Either one JSON document valid against ``call`` (a tool call's schema) or plain text
        that does not begin with ``{`` (nor with white space): ``tool_choice: auto`` on a base whose
        template cannot render tools (app/serving/tool_prompt.py)."""
        schema = {**call, "x-guidance": _COMPACT}
        lark = f"start: call | text\ncall: %json {json.dumps(schema)}\ntext: /[^{{\\s][\\s\\S]*/\n"
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"the tools' parameters cannot be used: {exc}", param=param) from exc
        return self._checked(grammar, param)

    def regex(self, pattern: str, param: str) -> str:
        try:
            grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"the regular expression cannot be used: {exc}", param=param) from exc
        return self._checked(grammar, param)

    def _checked(self, grammar: str, param: str) -> str:
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll)
        if error:
            raise InvalidRequest(f"{param} cannot be used as a grammar: {error}", param=param)
        return grammar

    # --- matchers (engine thread) -------------------------------------------------------------
    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self._ll, grammar)
