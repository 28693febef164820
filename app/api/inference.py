"""POST /classify, POST /generate and POST /embed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import ApiKeyDep, EmbeddingsDep, ServiceDep, TenantDep
from app.api.responses import INFERENCE, error_responses
from app.protocol.embeddings import EmbedRequest, EmbedResponse
from app.protocol.native import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse

router = APIRouter(tags=["inference"], dependencies=[ApiKeyDep], responses=error_responses(INFERENCE))


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
async def classify(
    req: ClassifyRequest, service: ServiceDep, tenant: TenantDep, request: Request
) -> ClassifyResponse:
    """Classify one or more texts with a classification adapter, or with an ensemble of them
    (`adapters`: every member runs its own rows of the same batches; `combine` says how their
    probabilities are combined)."""
    request.state.adapter = req.target
    return await service.classify(req, tenant)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}},
)
async def generate(
    req: GenerateRequest, service: ServiceDep, tenant: TenantDep, request: Request
) -> GenerateResponse | StreamingResponse:
    """Generate text from a prompt or chat messages, with a generation adapter or the bare base."""
    request.state.adapter = req.target
    if req.stream:
        events = await service.stream(req, tenant)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await service.generate(req, tenant)


@router.post("/embed", response_model=EmbedResponse)
async def embed(
    req: EmbedRequest, embeddings: EmbeddingsDep, tenant: TenantDep, request: Request
) -> EmbedResponse:
    """Sentence embeddings of one or more texts, from the bare base or an embedding adapter
    (pooled as the base's sentence-transformers configuration says; docs/embeddings.md)."""
    request.state.adapter = req.adapter
    return await embeddings.embed(req, tenant)
