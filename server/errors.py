"""HTTP errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Bad input never becomes a 500: request validation errors (including invalid JSON and NaN or
Infinity in number fields) are 400s, and every handled error is logged.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorBody, ErrorDetail

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
CONFLICT = "conflict_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

# The error type OpenAI-style clients expect for each status.
_TYPE_BY_STATUS = {
    400: INVALID_REQUEST,
    401: "authentication_error",
    403: "permission_error",
    404: NOT_FOUND,
    405: INVALID_REQUEST,
    409: CONFLICT,
    413: INVALID_REQUEST,
    422: INVALID_REQUEST,
    429: "rate_limit_error",
    503: UNAVAILABLE,
    504: "timeout_error",
}


class APIError(Exception):
    """An error to send to the client with its HTTP status."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.message, param=self.param, code=self.code)
        response.headers.update(self.headers or {})
        return response


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    error_type = _TYPE_BY_STATUS.get(status, SERVER_ERROR if status >= 500 else INVALID_REQUEST)
    return ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param=param, code=code))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Return a one-line message and the offending parameter of the first validation error."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    message = first.get("msg", "invalid value")
    if "input" in first and param is not None:
        message = f"{message} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"invalid {param}: {message}{more}" if param else f"{message}{more}"), param


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    # 503 is the expected status while the base loads or the server stops, not a fault.
    log = logger.error if exc.status >= 500 and exc.status != 503 else logger.info
    log("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    logger.info("%s %s -> 400: %s", request.method, request.url.path, message)
    return error_response(400, message, param=param, code="invalid_value")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
    return error_response(exc.status_code, str(exc.detail))


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, f"internal server error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
