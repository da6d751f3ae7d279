"""Typed errors → HTTP status codes, in one handler. Library errors (calibrator.errors) keep their meaning."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from calibrator.errors import (
    CalibrationError,
    InvalidTargetError,
    StoreBusyError,
    StoreUnavailableError,
    TargetUnreachableError,
    ThresholdChangedError,
    ThresholdNotFoundError,
    TooFewSamplesError,
    UnknownModelError,
)

# Seconds a client should wait before resending a batch refused as store_busy (other writers of its series won the
# race every time): Redis is up, so a prompt retry usually succeeds.
BUSY_RETRY_AFTER_S = 1


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


class SeriesLimitError(ServiceError):
    """A batch would start more (model, task) series for a tenant than KVZAP_MAX_SERIES_PER_TENANT allows."""

    status_code = 422
    code = "series_limit"


STATUS_OF_LIBRARY_ERROR: dict[type[CalibrationError], int] = {
    InvalidTargetError: 422,
    TooFewSamplesError: 422,
    TargetUnreachableError: 422,
    UnknownModelError: 404,
    ThresholdNotFoundError: 404,
    ThresholdChangedError: 409,
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
        gap = {} if error.gap is None else {"closest_below": error.gap[0], "closest_above": error.gap[1]}
        return {"achievable_min": error.achievable_min, "achievable_max": error.achievable_max, **gap}
    if isinstance(error, TooFewSamplesError):
        return {"available": error.available, "required": error.required}
    return {}


def validation_errors(error: RequestValidationError) -> list[dict]:
    """Where and why, without pydantic's echo of the input: the input may be NaN or Infinity (which Starlette
    cannot serialise, a 500 instead of the 422) or megabytes of body; ``loc`` already points at the value."""
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI reports a body that is not JSON as a validation error; it is a 400 (schemas.ERROR_RESPONSES).
        unparsable = [e for e in error.errors() if e["type"] == "json_invalid"]
        if unparsable:
            reason, at = unparsable[0].get("ctx", {}).get("error", "JSON decode error"), unparsable[0]["loc"][-1]
            return JSONResponse(error_body("bad_request", f"body is not valid JSON: {reason} (at character {at})"),
                                status_code=400)
        errors = validation_errors(error)
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return JSONResponse(error_body("invalid_request", detail, errors=errors), status_code=422)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, error: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "ApiKey"} if isinstance(error, UnauthorizedError) else None
        return JSONResponse(error_body(error.code, str(error)), status_code=error.status_code, headers=headers)

    @app.exception_handler(CalibrationError)
    async def _library(request: Request, error: CalibrationError) -> JSONResponse:
        headers = {"Retry-After": str(BUSY_RETRY_AFTER_S)} if isinstance(error, StoreBusyError) else None
        return JSONResponse(error_body(error.code, str(error), **_extra(error)), status_code=_status_of(error),
                            headers=headers)

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


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods some route serves at the request's path. Asked of each route through ``matches`` (a full match
    per method): FastAPI wraps included routers in routes that have no ``methods`` of their own, so reading that
    attribute sent an empty ``Allow``."""
    allowed = []
    for method in HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed
