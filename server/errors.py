"""HTTP errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Bad input never becomes a 500: request validation errors (including invalid JSON and NaN or
Infinity in number fields) are 400s, and every handled error is logged. A validation message
names each invalid field, its value (shortened when long) and what to send, and every body
carries a stable `code`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import CUSTOM_ERROR_CODES, TOO_MANY_CHOICES, ErrorBody, ErrorDetail, shorten_value

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
CONFLICT = "conflict_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

# Error codes sent in `error.code`; every error the API returns carries one. README.md lists them.
INVALID_JSON = "invalid_json"
INVALID_CONTENT_TYPE = "invalid_content_type"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
MISSING_FIELD = "missing_field"
NOT_FOUND_CODE = "not_found"
MODEL_NOT_FOUND = "model_not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
INTERNAL_ERROR = "internal_error"

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


# The code of an error raised without one. Raise sites give a more specific code where they can.
_DEFAULT_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    499: "client_closed_request",
    503: "service_unavailable",
    504: "timeout",
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
    """Build the OpenAI error body; without a `code`, the status's default code is sent, never null."""
    error_type = _TYPE_BY_STATUS.get(status, SERVER_ERROR if status >= 500 else INVALID_REQUEST)
    code = code or _DEFAULT_CODE_BY_STATUS.get(status, INTERNAL_ERROR if status >= 500 else "invalid_request")
    return ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param=param, code=code))


# The field a check across fields blames, so `param` is never null where one field can be named.
_PARAM_BY_CODE = {TOO_MANY_CHOICES: "n"}

# The value each pydantic type error expects, in the words of the JSON types a client sends.
_EXPECTED_BY_ERROR_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}

# The value each union branch expects, keyed by the branch tag pydantic puts into an error location.
_EXPECTED_BY_BRANCH = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean (true or false)",
    "list[str]": "a list of strings",
    "list[dict[str,any]]": "a list of content parts (objects with 'type' and 'text')",
}

# The fix for a missing required field, keyed by the field's own name.
_MISSING_FIELD_HINTS = {
    "model": "send a model id that GET /v1/models lists",
    "prompt": "send a string or a list of strings",
    "messages": 'send a list of messages such as [{"role": "user", "content": "..."}]',
    "role": "send one of 'system', 'user', 'assistant', 'developer' or 'tool'",
    "task": "send the task name as the query parameter ?task=NAME",
    "content": "send the message text as a string, because this server has no tool calls and every message needs text",
}

_BRANCH_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "any"})


def model_not_found_message(model: str) -> str:
    """Build the 404 message for a model id that does not exist or that the caller's key cannot use."""
    return f"the model {model!r} does not exist; GET /v1/models lists the base and every task"


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """Return "1 token", "2 tokens": the count with the noun in the form that fits it."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field of a request: its name as the client wrote it, what is wrong, and the code."""

    param: str | None
    message: str
    code: str


def _is_branch_tag(part: object) -> bool:
    """Tell whether a location part names a union branch (`str`, `list[str]`) rather than a field."""
    if not isinstance(part, str):
        return False
    return not part.isidentifier() or part in _BRANCH_TYPE_NAMES or part[:1].isupper()


def _split_location(loc: tuple) -> tuple[str | None, str | None]:
    """Return the field path (`messages[0].role`) up to the first union branch, and that branch.

    An error inside a branch (`prompt`, branch `list[str]`, item 0) belongs to the field. The
    client sent one value for the field and cannot choose a branch.
    """
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not path:
            continue
        if _is_branch_tag(part):
            return path or None, str(part)
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None, None


# Bound errors of numbers: the words of the message and the key of the bound in the error context.
_BOUND_WORDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("greater than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _describe(error: dict, param: str) -> FieldProblem:
    """Turn one pydantic error on a field into a plain message with its code."""
    kind = error.get("type", "")
    context = error.get("ctx") or {}
    got = f", got {shorten_value(error['input'])}" if "input" in error else ""

    # 1. A missing field or a value of the wrong JSON type.
    if kind == "missing":
        hint = _MISSING_FIELD_HINTS.get(param.rsplit(".", 1)[-1], "add it to the request")
        return FieldProblem(param, f"{param} is missing; {hint}", MISSING_FIELD)
    if kind in _EXPECTED_BY_ERROR_TYPE:
        return FieldProblem(param, f"{param} must be {_EXPECTED_BY_ERROR_TYPE[kind]}{got}", INVALID_TYPE)

    # 2. A value of the right type outside what the field allows.
    if kind in _BOUND_WORDS:
        words, key = _BOUND_WORDS[kind]
        return FieldProblem(param, f"{param} must be {words} {context.get(key)}{got}", INVALID_VALUE)
    if kind == "finite_number":
        return FieldProblem(param, f"{param} must be a finite number{got}", INVALID_VALUE)
    if kind in ("string_too_short", "too_short"):
        expected = "a non-empty string" if kind == "string_too_short" else "a non-empty list"
        return FieldProblem(param, f"{param} must be {expected}{got}", INVALID_VALUE)
    if kind == "literal_error":
        return FieldProblem(param, f"{param} must be one of {context.get('expected')}{got}", INVALID_VALUE)

    # 3. A validator's own error.
    if kind in CUSTOM_ERROR_CODES:
        # A PydanticCustomError of server/protocol.py: its message names the value and the fix.
        return FieldProblem(param, str(error.get("msg")), kind)
    # A plain ValueError of a validator, or an error type this table does not know yet.
    reason = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return FieldProblem(param, f"invalid {param}: {reason}{got}", INVALID_VALUE)


def _describe_union(errors: list[dict], param: str) -> FieldProblem:
    """Describe the errors of every branch of a union field (`prompt: str | list[str]`) as one."""
    branches: list[str] = []
    got = ""
    for error in errors:
        loc = tuple(error.get("loc", ()))
        _, branch = _split_location(loc)
        if branch is not None and branch not in branches:
            branches.append(branch)
        if branch is not None and loc[-1] == branch and "input" in error:
            # An error on the whole value, not on one of its items: its input is what the client sent.
            got = f", got {shorten_value(error['input'])}"
    expected = " or ".join(_EXPECTED_BY_BRANCH.get(branch.lower().replace(" ", ""), branch) for branch in branches)
    hint = _MISSING_FIELD_HINTS.get(param.rsplit(".", 1)[-1])
    if hint is not None and all(error.get("input", "") is None for error in errors):
        # null for a required field is the same mistake as leaving it out, so it gets the same fix.
        return FieldProblem(param, f"{param} must be {expected}{got}; {hint}", INVALID_TYPE)
    return FieldProblem(param, f"{param} must be {expected}{got}", INVALID_TYPE)


def _body_problem(error: dict, request: Request) -> FieldProblem:
    """Describe an error on the request body as a whole: not JSON, empty, or not a JSON object."""
    kind = error.get("type")
    example = 'send a JSON object such as {"model": "...", "prompt": "..."}'
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "it cannot be parsed")
        position = error.get("loc", ())[-1] if len(error.get("loc", ())) > 1 else None
        where = f" at character {position}" if isinstance(position, int) else ""
        return FieldProblem(None, f"the request body is not valid JSON ({reason}{where}); {example}", INVALID_JSON)
    if kind == "missing":
        return FieldProblem(None, f"the request body is empty; {example}", INVALID_JSON)
    content_type = request.headers.get("content-type")
    if isinstance(error.get("input"), bytes | bytearray) or not (content_type or "").startswith("application/json"):
        found = "no Content-Type header" if content_type is None else f"Content-Type {content_type!r}"
        return FieldProblem(
            None,
            f"the request has {found}; send the body as JSON with the header 'Content-Type: application/json'",
            INVALID_CONTENT_TYPE,
        )
    got = shorten_value(error.get("input"))
    return FieldProblem(None, f"the request body must be a JSON object, got {got}; {example}", INVALID_TYPE)


def validation_problems(exc: RequestValidationError, request: Request) -> list[FieldProblem]:
    """Return one problem per invalid field, in the order the errors came, union branches merged."""
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            return [_body_problem(error, request)]

    by_field: dict[str | None, list[dict]] = {}
    for error in errors:
        param, _ = _split_location(tuple(error.get("loc", ())))
        by_field.setdefault(param, []).append(error)

    problems = []
    for param, field_errors in by_field.items():
        first = field_errors[0]
        if param is None and _is_custom(first):
            # A check across fields (a model validator): its message names the fields.
            problems.append(FieldProblem(_PARAM_BY_CODE.get(first["type"]), str(first.get("msg")), first["type"]))
        elif param is None:
            problems.append(_body_problem(first, request))
        elif any(_split_location(tuple(e.get("loc", ())))[1] is not None for e in field_errors):
            problems.append(_describe_union(field_errors, param))
        else:
            problems.append(_describe(first, param))
    return problems or [FieldProblem(None, "the request is invalid", INVALID_VALUE)]


def _is_custom(error: dict) -> bool:
    """Tell whether an error comes from a PydanticCustomError of server/protocol.py."""
    return error.get("type", "") in CUSTOM_ERROR_CODES


def _validation_message(problems: list[FieldProblem]) -> str:
    if len(problems) == 1:
        return problems[0].message
    # Numbered, because a problem's own message may contain a semicolon.
    listed = " ".join(f"({number}) {problem.message}." for number, problem in enumerate(problems, start=1))
    return f"{plural(len(problems), 'invalid field')}: {listed}"


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    # 503 is the expected status while the base loads or the server stops, not a fault.
    log = logger.error if exc.status >= 500 and exc.status != 503 else logger.info
    log("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = validation_problems(exc, request)
    message = _validation_message(problems)
    logger.info("%s %s -> 400: %s", request.method, request.url.path, message)
    first = problems[0]
    return error_response(400, message, param=first.param, code=first.code)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}; the API serves /v1/models, /v1/completions, /v1/chat/completions and /v1/deltas"
        return error_response(404, message, code=NOT_FOUND_CODE)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path!r}; use {allowed or 'another method'}"
        return error_response(405, message, code=METHOD_NOT_ALLOWED)
    return error_response(exc.status_code, str(exc.detail))


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, f"internal server error: {type(exc).__name__}", code=INTERNAL_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
