"""GET /healthz, GET /readyz and GET /metrics."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from app.models.quantize import Quantization
from app.platform import capability

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model: str | None
    quantization: Quantization | None = None
    capability: dict[str, Any] | None = None  # app.platform.Capability.as_dict()


_READY: dict[int | str, dict[str, Any]] = {
    200: {"model": Readiness, "description": "ready"},
    503: {"model": Readiness, "description": "starting, shutting down or the engine failed"},
}
_METRICS: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}
}


@router.get("/readyz", response_model=Readiness, responses=_READY)
async def readyz(request: Request) -> JSONResponse:
    """The base model is loaded and the engine is running."""
    engine = getattr(request.app.state, "engine", None)
    ready = engine is not None and engine.running and not request.app.state.draining
    body = {
        "status": "ready" if ready else "not_ready",
        "model": getattr(request.app.state, "model_id", None),
        "quantization": getattr(request.app.state, "quantization", None),
        "capability": capability().as_dict(),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses=_METRICS)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
