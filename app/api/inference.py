"""POST /classify and POST /generate."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import ApiKeyDep, ServiceDep, TenantDep
from app.api.responses import INFERENCE, error_responses
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
