"""``GET /docs`` (Swagger UI) and ``GET /redoc``, with their assets served by this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank on a box
with no internet. This is FastAPI's self-hosting recipe
(https://fastapi.tiangolo.com/how-to/custom-docs-ui-assets/) with the files that the
``fastapi-offline`` package ships (Swagger UI 5, which reads OpenAPI 3.1, and ReDoc 2):
nothing is vendored here, and nothing is fetched from elsewhere. The pages and assets
are open, as ``/openapi.json`` is; the OpenAPI document declares the bearer token, so
Swagger UI's "Authorize" sends it with "Try it out".
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from statehost.server.errors import NotFoundError

__all__ = ["ASSETS", "router"]

router = APIRouter(tags=["docs"], include_in_schema=False)

#: the files the pages use -> their media types; nothing else is served from the folder.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_PREFIX = "/docs/assets"
_OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def _folder() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{_OAUTH2_REDIRECT}",
        swagger_js_url=f"{root}{_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{root}{_PREFIX}/favicon.png",
        # validatorUrl: no badge fetched from validator.swagger.io; the token stays across
        # reloads of the page.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
    )


@router.get(_OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{_PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{_PREFIX}/favicon.png",
        with_google_fonts=False,
    )


@router.get(_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFoundError(f"GET {_PREFIX}/{name}: no such asset; the docs use "
                            f"{', '.join(sorted(ASSETS))}.")
    return FileResponse(_folder() / name, media_type=ASSETS[name],
                        headers={"cache-control": "public, max-age=86400"})
