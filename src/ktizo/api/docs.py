"""Swagger UI at ``/docs`` from files in the package, not a CDN: provisioning networks have no internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static" / "swagger"
DOCS_URL = "/docs"
STATIC_URL = "/docs/static"

# FastAPI's defaults plus one: Swagger UI's default validatorUrl is validator.swagger.io, so switch it off.
_PARAMETERS = {"validatorUrl": None}


def install_docs(app: FastAPI) -> None:
    """Add ``GET /docs`` (Swagger UI over ``app.openapi_url``), its OAuth2 redirect page and its vendored files to
    ``app``, which must be built with ``docs_url=None`` so FastAPI does not add its CDN-backed page as well."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("install_docs needs the OpenAPI schema: the app was built with openapi_url=None")
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="docs-static")
    redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        # Behind a proxy that adds a path prefix every URL needs it, as in FastAPI's own page.
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon-32x32.png",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters={**_PARAMETERS, **(app.swagger_ui_parameters or {})},
        )

    if redirect_url:

        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()
