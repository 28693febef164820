"""GET /ui: a small page over the same API (pick an adapter, classify with token attributions,
stream a reply); static files in the package, no build step, nothing from outside. Off with
``ADAPTERSERVE_UI=false``."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(tags=["ui"], include_in_schema=False)
_FILES = resources.files("app") / "ui"


def _file(name: str, media_type: str) -> Response:
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
    }
    return Response((_FILES / name).read_bytes(), media_type=media_type, headers=headers)


@router.get("/ui")
async def page() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/ui/ui.js")
async def script() -> Response:
    return _file("ui.js", "text/javascript; charset=utf-8")
