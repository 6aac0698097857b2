"""Domain errors as the API answers them: JSON bodies over the shared status table (``ktizo.http.errors``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ktizo.domain.errors import KtizoError, Unauthenticated, ValidationFailed
from ktizo.http.errors import retry_after, status_of


def status_for(exc: KtizoError) -> int:
    return status_of(exc)[0]


def error_body(exc: KtizoError) -> dict[str, Any]:
    if isinstance(exc, ValidationFailed):
        # The same shape FastAPI uses for request validation, so clients parse one format.
        loc: list[str] = ["body", *(exc.field.split(".") if exc.field else [])]
        return {"detail": [{"loc": loc, "msg": exc.message, "type": "value_error"}]}
    return {"detail": exc.message}


class ErrorOut(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: list[FieldError]


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI descriptions of the error answers a route can give."""
    text = {
        401: "No or invalid credentials: send `Authorization: Bearer <token>`",
        403: "Your role does not allow this",
        404: "Not found",
        409: "Conflicts with the current state",
        413: "Request body too large",
        429: "Too many failed attempts: wait `Retry-After` seconds",
        503: "Not ready: something must be configured first",
    }
    return {code: {"model": ErrorOut, "description": text.get(code, "Error")} for code in codes}


# The agent enrollment contract (seed 003) answers malformed input with 400, not 422.
BAD_REQUEST_PATHS = ("/api/v1/enroll", "/api/v1/agent/", "/api/enroll")


def _bad_request_path(request: Request) -> bool:
    return request.url.path.startswith(BAD_REQUEST_PATHS)


def install(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KtizoError)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else retry_after(exc)
        status = status_for(exc)
        if status == 422 and _bad_request_path(request):
            status = 400
        return JSONResponse(error_body(exc), status_code=status, headers=headers or None)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if _bad_request_path(request):
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=400)
        return await request_validation_exception_handler(request, exc)

    app.add_exception_handler(KtizoError, handle)
    app.add_exception_handler(RequestValidationError, invalid_request)
