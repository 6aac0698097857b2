"""Domain errors to HTTP statuses: the one table."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ktizo.domain.errors import (
    Conflict,
    InvalidTransition,
    KtizoError,
    NotFound,
    NotReady,
    PermissionDenied,
    TooManyAttempts,
    Unauthenticated,
    ValidationFailed,
)

STATUS: dict[type[KtizoError], int] = {
    ValidationFailed: 422,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    InvalidTransition: 409,
    Conflict: 409,
    TooManyAttempts: 429,
    NotReady: 503,
}


def status_for(exc: KtizoError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


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


def install(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KtizoError)
        headers = None
        if isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, TooManyAttempts):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=headers)

    app.add_exception_handler(KtizoError, handle)
