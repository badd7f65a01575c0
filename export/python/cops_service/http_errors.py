"""The service's error answers: every one is JSON ``{"error": code, "message": ..., "fix": ...}``.

A refusal is a FastAPI ``HTTPException`` whose detail is that JSON object (no exception class of
our own: the status code is the type). The handlers installed by :func:`install_handlers` give
FastAPI's own errors (unknown path, wrong method, invalid query parameter) the same shape, and
turn an unexpected exception into a JSON 500 that names it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ENDPOINTS", "error_response", "install_handlers", "refuse"]

ENDPOINTS = "GET /health, GET /ready, GET /describe, POST /predict (and GET /docs)"
_LOG = logging.getLogger("cops_service")


def refuse(status: int, code: str, message: str, fix: str) -> HTTPException:
    """The exception to raise for a refused request: ``status`` with the JSON error body."""
    return HTTPException(status_code=status, detail={"error": code, "message": message, "fix": fix})


def error_response(status: int, code: str, message: str, fix: str) -> JSONResponse:
    """A JSON error response (for code that answers without raising, e.g. middleware)."""
    return JSONResponse({"error": code, "message": message, "fix": fix}, status_code=status)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = exc.headers
    if isinstance(exc.detail, dict) and "error" in exc.detail:
        return JSONResponse(exc.detail, status_code=exc.status_code, headers=headers)
    path = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        body = {
            "error": "not_found",
            "message": f"no endpoint {path}",
            "fix": f"use one of: {ENDPOINTS}",
        }
    elif exc.status_code == 405:
        body = {
            "error": "method_not_allowed",
            "message": f"{path} is not allowed",
            "fix": f"use one of: {ENDPOINTS}",
        }
    else:
        body = {
            "error": f"http_{exc.status_code}",
            "message": f"{path}: {exc.detail}",
            "fix": "check the request against GET /docs",
        }
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _describe_validation(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()))
        given = f" (got {err['input']!r})" if "input" in err else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{given}")
    return "; ".join(parts)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        {
            "error": "invalid_parameter",
            "message": f"invalid request parameter: {_describe_validation(list(exc.errors()))}",
            "fix": "see GET /docs; e.g. POST /predict?map=grey16&map_size=original",
        },
        status_code=400,
    )


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    _LOG.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {
            "error": "internal_error",
            "message": f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}",
            "fix": "this is a bug in the service or its bundle, not in the request: report it "
            "with the service log",
        },
        status_code=500,
    )


def install_handlers(app: FastAPI) -> None:
    """Make every error answer of ``app`` the JSON error shape."""
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
