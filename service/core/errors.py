"""Typed errors → HTTP status codes, in one handler. Library errors (calibrator.errors) keep their meaning."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from calibrator.errors import (
    CalibrationError,
    InvalidTargetError,
    StoreUnavailableError,
    TargetUnreachableError,
    ThresholdNotFoundError,
    TooFewSamplesError,
    UnknownModelError,
)


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    status_code = 403
    code = "forbidden"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    code = "payload_too_large"


STATUS_OF_LIBRARY_ERROR: dict[type[CalibrationError], int] = {
    InvalidTargetError: 422,
    TooFewSamplesError: 422,
    TargetUnreachableError: 422,
    UnknownModelError: 404,
    ThresholdNotFoundError: 404,
    StoreUnavailableError: 503,
}


def error_body(code: str, detail: str, **extra: object) -> dict:
    return {"error": code, "detail": detail, **extra}


def _status_of(error: CalibrationError) -> int:
    for kind, status in STATUS_OF_LIBRARY_ERROR.items():
        if isinstance(error, kind):
            return status
    return 400


def _extra(error: Exception) -> dict:
    if isinstance(error, TargetUnreachableError):
        return {"achievable_min": error.achievable_min, "achievable_max": error.achievable_max}
    if isinstance(error, TooFewSamplesError):
        return {"available": error.available, "required": error.required}
    return {}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, error: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "ApiKey"} if isinstance(error, UnauthorizedError) else None
        return JSONResponse(error_body(error.code, str(error)), status_code=error.status_code, headers=headers)

    @app.exception_handler(CalibrationError)
    async def _library(request: Request, error: CalibrationError) -> JSONResponse:
        return JSONResponse(error_body(error.code, str(error), **_extra(error)), status_code=_status_of(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status_code == 405:  # Starlette lists only the first matching route's methods
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        return JSONResponse(error_body(code, str(error.detail)), status_code=error.status_code, headers=headers)

    @app.exception_handler(RedisError)
    async def _redis(request: Request, error: RedisError) -> JSONResponse:
        detail = f"Redis is unavailable ({type(error).__name__}: {error})"
        return JSONResponse(error_body(StoreUnavailableError.code, detail), status_code=503)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    scope = {**request.scope, "method": "GET"}
    methods: set[str] = set()
    for route in app.router.routes:
        if route.matches(scope)[0] != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)
