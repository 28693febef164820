"""OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings,
GET /v1/models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.api.deps import ApiKeyDep, EmbeddingsDep, TenantDep, state
from app.api.responses import OPENAI, error_responses
from app.protocol.embeddings import EmbeddingList, EmbeddingRequest
from app.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from app.serving.openai_service import OpenAIService

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[ApiKeyDep], responses=error_responses(OPENAI, openai=True)
)
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}
}


async def get_openai(request: Request) -> OpenAIService:
    return state(request, "openai")  # type: ignore[return-value]


OpenAIDep = Annotated[OpenAIService, Depends(get_openai)]


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/chat/completions", response_model=ChatCompletion, responses=_SSE)
async def chat_completions(
    req: ChatCompletionRequest, openai: OpenAIDep, tenant: TenantDep, request: Request
) -> ChatCompletion | StreamingResponse:
    """Chat with an adapter (``model`` = adapter name) or the base model (``model`` = its id)."""
    request.state.adapter = openai.adapter_of(req.model)
    result = await openai.chat(req, tenant)
    return result if isinstance(result, ChatCompletion) else _stream(result)


@router.post("/completions", response_model=Completion, responses=_SSE)
async def completions(
    req: CompletionRequest, openai: OpenAIDep, tenant: TenantDep, request: Request
) -> Completion | StreamingResponse:
    """Complete a raw prompt (no chat template) with an adapter or the base model."""
    request.state.adapter = openai.adapter_of(req.model)
    result = await openai.complete(req, tenant)
    return result if isinstance(result, Completion) else _stream(result)


@router.post("/embeddings", response_model=EmbeddingList)
async def embeddings(
    req: EmbeddingRequest, embeddings: EmbeddingsDep, openai: OpenAIDep, tenant: TenantDep, request: Request
) -> EmbeddingList:
    """Embeddings of texts or token ids with an embedding adapter or the base model (``model``)."""
    request.state.adapter = adapter = openai.adapter_of(req.model)
    if adapter is not None:
        await openai.check_model(adapter, tenant)
    return await embeddings.openai(req, tenant)


@router.get("/models", response_model=ModelList)
async def list_models(openai: OpenAIDep, tenant: TenantDep) -> ModelList:
    """The base model and every generation adapter (``parent`` = the base model's id)."""
    return openai.models(tenant)


@router.get("/models/{model}", response_model=ModelCard)
async def get_model(model: str, openai: OpenAIDep, tenant: TenantDep) -> ModelCard:
    """One model of the list."""
    return await openai.model(model, tenant)
