"""Sentence embeddings: the bare base or an embedding adapter (PEFT ``FEATURE_EXTRACTION`` LoRA, or a
bottleneck adapter), as rows of the classification lane's batches, pooled as the base says
(:mod:`app.models.pooling`). An ensemble's vector is its members' weighted mean (normalized again
when the base normalizes); ``dimensions`` keeps the first n (normalized again likewise)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np

from app.errors import InvalidRequest
from app.protocol.embeddings import (
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    EmbedRequest,
    EmbedResponse,
    EmbedUsage,
)
from app.serving.service import InferenceService, flow_of, off_loop
from app.tenants import EVERYONE, Tenant


@dataclass(frozen=True)
class Vectors:
    vectors: np.ndarray  # [inputs, dimensions], float32
    tokens: int
    normalized: bool


class EmbeddingService:
    """``/embed`` and ``/v1/embeddings`` on top of :class:`InferenceService`."""

    def __init__(self, service: InferenceService, model_id: str) -> None:
        self.service = service
        self.model_id = model_id

    @property
    def dimensions(self) -> int:
        return self.service.engine.runner.base.spec.hidden_size

    async def embed(self, req: EmbedRequest, tenant: Tenant = EVERYONE) -> EmbedResponse:
        s = self.service
        texts = req.texts
        ids = await off_loop(sum(map(len, texts)), lambda: [s._encode(t, "inputs") for t in texts])
        out = await self._vectors(req.adapter, ids, req.dimensions, req.priority, tenant)
        return EmbedResponse(
            adapter=req.adapter,
            embeddings=out.vectors.tolist(),
            dimensions=out.vectors.shape[1],
            normalized=out.normalized,
            usage=EmbedUsage(input_tokens=out.tokens),
        )

    async def openai(self, req: EmbeddingRequest, tenant: Tenant = EVERYONE) -> EmbeddingList:
        s = self.service
        texts, tokens = _split(req.input)

        def encode() -> list[list[int]]:
            if texts:
                return [s._encode(t, "input") for t in texts]
            return [s._within_limit(s._check_ids(t), "input") for t in tokens]

        ids = await off_loop(sum(map(len, texts)), encode)
        adapter = None if req.model == self.model_id else req.model
        out = await self._vectors(adapter, ids, req.dimensions, req.priority, tenant)
        data = [
            Embedding(index=i, embedding=_b64(v) if req.encoding_format == "base64" else v.tolist())
            for i, v in enumerate(out.vectors)
        ]
        return EmbeddingList(
            data=data,
            model=req.model,
            usage=EmbeddingUsage(prompt_tokens=out.tokens, total_tokens=out.tokens),
        )

    async def _vectors(
        self, adapter: str | None, ids: list[list[int]], dimensions: int | None, priority: int, tenant: Tenant
    ) -> Vectors:
        s = self.service
        if len(ids) > s.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"{len(ids)} inputs; at most {s.settings.max_inputs_per_request} per request", param="inputs"
            )
        longest = max(len(i) for i in ids)
        if s.max_context is not None and longest > s.max_context:
            raise InvalidRequest(
                f"inputs: {longest} tokens; the base model reads at most {s.max_context}", param="inputs"
            )
        if dimensions is not None and dimensions > self.dimensions:
            raise InvalidRequest(
                f"dimensions {dimensions}: this model's embeddings have {self.dimensions}", param="dimensions"
            )
        target = await s.catalog.resolve(adapter, "embed", None, tenant.may_use)
        s.catalog.touch(target)
        flow = flow_of(tenant, target, priority)
        engine = s.engine
        if target.members:
            runs = [
                engine.classify(h.record.handle, ids, h.weights, flow, output="embedding")
                for h in target.members
            ]
            weights = [h.weight for h in target.members] if target.ensemble else [1.0]
        else:
            runs, weights = [engine.classify(None, ids, None, flow, output="embedding")], [1.0]
        outs = await asyncio.gather(*runs)
        w = np.asarray(weights, dtype=np.float32) / float(sum(weights))
        vectors = np.einsum("m,mij->ij", w, np.asarray(outs, dtype=np.float32))
        normalize = engine.runner.base.pooling.normalize
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize and (len(outs) > 1 or dimensions is not None):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Vectors(np.ascontiguousarray(vectors, dtype=np.float32), sum(len(i) for i in ids), normalize)


def _b64(v: np.ndarray) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")


def _split(value: str | list[str] | list[int] | list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """OpenAI's ``input``: texts, or token-id lists (one list of ints is one input)."""
    if isinstance(value, str):
        return [value], []
    texts = [v for v in value if isinstance(v, str)]
    ints = [v for v in value if isinstance(v, int)]
    lists = [list(v) for v in value if isinstance(v, list)]
    if ints and len(ints) == len(value):
        return [], [ints]
    if len(texts) == len(value) or len(lists) == len(value):
        return texts, lists
    raise InvalidRequest("input mixes texts and token ids", param="input")
