"""The web page at ``/``: plain HTML, one script and one stylesheet, no build step.

The page only talks to this service's own ``/v1`` API; its Content Security
Policy holds the browser to that, so nothing is ever loaded from elsewhere
and injected markup could not run a script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from rag_service.errors import NotFound

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"

#: The files under ``/static/`` and their media types; anything else is a 404.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load (cheap: FileResponse sends an ETag), so an
    # upgraded service never pairs a new page with a stale script.
    "Cache-Control": "no-cache",
}


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def index() -> FileResponse:
    """The web page: pick a collection, upload files, ask questions, read the sources."""
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    """The page's script and stylesheet."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no static file {name[:80]!r}")
    return _file(name, media_type)
