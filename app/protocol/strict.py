"""The base of every request schema: unknown fields refused, JSON types as documented, and text that
is valid Unicode (a lone surrogate such as ``"\\ud800"`` is valid JSON but no text: no tokenizer,
template or grammar can take it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

INVALID_UNICODE = "invalid_unicode"  # the validation error's type; its ``field`` is the answer's param

_SURROGATES = range(0xD800, 0xE000)


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where in ``value`` (a parsed JSON value) a string holds a lone surrogate: ``path`` of the first
    such string (``messages.0.content``), its character index after ``@``; None when there is none."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{path}@{exc.start}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = lone_surrogate(key, path) or lone_surrogate(item, f"{path}.{key}" if path else str(key))
            if where is not None:
                return where
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            where = lone_surrogate(item, f"{path}.{i}" if path else str(i))
            if where is not None:
                return where
    return None


class StrictModel(BaseModel):
    """Unknown fields are refused and JSON types are taken as documented (no ``"5"`` or ``true`` for
    5); every string, at any depth, must be valid Unicode."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            field, _, index = where.rpartition("@")
            raise PydanticCustomError(
                INVALID_UNICODE,
                "{what} holds a lone UTF-16 surrogate at character {index}: send text as valid Unicode "
                "(in JSON, a \\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one)",
                {"field": field, "what": field or "a field name", "index": int(index)},
            )
        return data
