"""Grammar-constrained decoding libraries on this machine, for choosing the structured-output engine:
llguidance, outlines-core and xgrammar (each measured when importable; only the chosen one is a
dependency), on the default base's tokenizer and a JSON schema.

    python -m bench.grammar_engines [--turns 3]

For each library: the time to prepare the tokenizer (once per server), to compile the schema (once
per request or cached), and the per-step cost of computing the allowed-token mask of one row and
advancing it by a token, over the tokens of a valid document (what every constrained row pays at
every decode step). Prints one markdown table (medians over the turns).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.config import Settings
from app.models.sources import resolve_model_path

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["refund", "delivery", "technical", "other"]},
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "items": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "summary": {"type": "string"},
    },
    "required": ["intent", "order_id", "urgency", "items", "summary"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps(
    {
        "intent": "refund",
        "order_id": "AB123456",
        "urgency": 4,
        "items": ["blue kettle", "two mugs"],
        "summary": "The kettle arrived broken and the customer wants the money back.",
    }
)

# (prepare tokenizer, compile schema, per-step: mask + advance by a token) per library
Engine = tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any, list[int]], None]]


def _llguidance(tok: PreTrainedTokenizerBase, vocab: int) -> Engine | None:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        return None
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def prepare() -> Any:
        return llguidance.hf.from_tokenizer(tok, n_vocab=vocab)  # type: ignore[arg-type]

    def compile_(info: Any) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        return llguidance.LLMatcher(info, grammar)

    def steps(matcher: Any, ids: list[int]) -> None:
        for t in ids:
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            assert matcher.consume_token(t), matcher.get_error()

    return prepare, compile_, steps


def _xgrammar(tok: PreTrainedTokenizerBase, vocab: int) -> Engine | None:
    try:
        import xgrammar
    except ImportError:
        return None
    mask = xgrammar.allocate_token_bitmask(1, vocab)

    def prepare() -> Any:
        return xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))

    def compile_(compiler: Any) -> Any:
        return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))

    def steps(matcher: Any, ids: list[int]) -> None:
        for t in ids:
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(t)

    return prepare, compile_, steps


def _outlines(tok: PreTrainedTokenizerBase, vocab: int) -> Engine | None:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    eos = tok.eos_token_id
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)

    def prepare() -> Any:
        # outlines-core takes the vocabulary as decoded strings: the byte-level (GPT-2) alphabet is
        # mapped back to bytes by the caller (outlines' own adapter does this; here the same rule)
        back = _byte_alphabet()
        words: dict[str, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i == eos or token in tok.all_special_tokens:
                continue
            try:
                text = bytes(back[c] for c in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue  # partial UTF-8 byte tokens: outlines-core cannot take them as strings
            words.setdefault(text, []).append(i)
        return Vocabulary(eos, words)

    def compile_(vocabulary: Any) -> Any:
        return Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))

    def steps(guide: Any, ids: list[int]) -> None:
        for t in ids:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            guide.advance(t)

    return prepare, compile_, steps


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte in a token string."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    settings = Settings()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(settings.base_model, settings.cache_dir)[0])
    vocab = len(tok)
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    makers = {"llguidance": _llguidance, "xgrammar": _xgrammar, "outlines-core": _outlines}
    engines = {name: e for name, make in makers.items() if (e := make(tok, vocab)) is not None}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    errors: dict[str, str] = {}
    for _ in range(args.turns):
        for name, (prepare, compile_, steps) in engines.items():
            if name in errors:
                continue
            try:
                info, t_prep = _timed(prepare)
                matcher, t_comp = _timed(functools.partial(compile_, info))
                _, t_steps = _timed(functools.partial(steps, matcher, ids))
            except Exception as exc:  # report a library that fails on this tokenizer or schema
                errors[name] = f"{type(exc).__name__}: {exc}"[:120]
                continue
            for key, value in (("prep", t_prep), ("compile", t_comp), ("step", t_steps / len(ids))):
                times[name].setdefault(key, []).append(value)
    props = len(SCHEMA["properties"])
    print(f"\nschema: {props} properties; document: {len(ids)} tokens; vocabulary {vocab}\n")
    print("| library | tokenizer set-up (ms) | schema compile (ms) | mask + advance per step (µs) |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        if name in errors:
            print(f"| {name} | failed: {errors[name]} | | |")
            continue
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"| {name} | {med['prep'] * 1e3:.0f} | {med['compile'] * 1e3:.1f} | {med['step'] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
