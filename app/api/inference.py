"""POST /classify and POST /generate."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import ServiceDep
from app.api.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse

router = APIRouter(tags=["inference"])


@router.post("/classify", response_model=ClassifyResponse)
async def classify(req: ClassifyRequest, service: ServiceDep, request: Request) -> ClassifyResponse:
    """Classify one or more texts with a classification adapter."""
    request.state.adapter = req.adapter
    return await service.classify(req)


@router.post("/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest, service: ServiceDep, request: Request) -> GenerateResponse:
    """Generate text from a prompt or chat messages, with a generation adapter or the bare base."""
    request.state.adapter = req.adapter
    return await service.generate(req)
