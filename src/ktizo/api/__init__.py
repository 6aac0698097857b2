"""The JSON HTTP API (``/api/v1``, OpenAPI at ``/docs``) and the endpoints real Talos clients call."""

from ktizo.api.middleware import BodyLimitMiddleware
from ktizo.api.routes import build_router, install_error_handlers

__all__ = ["BodyLimitMiddleware", "build_router", "install_error_handlers"]
