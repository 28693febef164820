"""Sentence embeddings on the wire: ``POST /embed`` (native) and ``POST /v1/embeddings`` (OpenAI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from app.protocol.native import PRIORITY_FIELD
from app.protocol.strict import StrictModel

_DIMENSIONS = Field(
    None,
    ge=1,
    description="keep the first n dimensions (then normalized again, as sentence-transformers' "
    "truncate_dim does); meaningful for models trained for it (Matryoshka)",
)


class EmbedRequest(StrictModel):
    adapter: str | None = Field(None, description="an embedding adapter or composition; null: the bare base")
    inputs: str | list[str] = Field(description="one text or a list of texts")
    dimensions: int | None = _DIMENSIONS
    priority: int = PRIORITY_FIELD

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("inputs must be non-empty texts")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class EmbedUsage(BaseModel):
    input_tokens: int


class EmbedResponse(BaseModel):
    adapter: str | None = Field(description="the adapter or composition; null: the bare base model")
    embeddings: list[list[float]]
    dimensions: int
    normalized: bool = Field(description="whether the vectors have unit length")
    usage: EmbedUsage


class EmbeddingRequest(StrictModel):
    model: str = Field(description="an embedding adapter, or the base model's id for no adapter")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, a list of token ids, or lists of token ids"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = _DIMENSIONS
    user: str | None = None
    priority: int = PRIORITY_FIELD

    @field_validator("input")
    @classmethod
    def _non_empty(
        cls, v: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if any(isinstance(t, str) and not t.strip() for t in items):
            raise ValueError("input must not contain empty texts")
        if any(isinstance(t, list) and not t for t in items):
            raise ValueError("input must not contain empty token lists")
        return v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
