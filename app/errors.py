"""Errors a client can act on, and the one JSON shape every error response has:

{"error": {"code": "...", "message": "...", "fields": [{"field": "...", "problem": "..."}]}}
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


# A default object repr, `<_io.BytesIO object at 0x7f...>`, as libraries put into their error
# messages (Pillow names the file object it could not read): it tells a user nothing and an
# attacker the process's heap addresses.
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


def without_reprs(text: str) -> str:
    """`text` without the object reprs in it."""
    return _OBJECT_REPR.sub("", text)


class FieldProblem(BaseModel):
    field: str = Field(examples=["forget.ids"])
    problem: str = Field(examples=["3 ids are not in the data set, e.g. 'img-0042'"])

    _no_reprs = field_validator("problem")(without_reprs)


class ErrorDetail(BaseModel):
    """Every error answer's text passes here: no object reprs leave the service."""

    code: str = Field(examples=["invalid_request"])
    message: str = Field(examples=["forget.ids: 3 ids are not in the data set, e.g. 'img-0042'"])
    fields: list[FieldProblem] = Field(default_factory=list)

    _no_reprs = field_validator("message")(without_reprs)


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, fields: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        self.headers: dict[str, str] = {}  # sent with the response (e.g. Retry-After)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = ErrorResponse(
            error=ErrorDetail(code=self.code, message=self.message, fields=self.fields)
        )
        return JSONResponse(body.model_dump(), status_code=self.status_code, headers=headers)


class Unauthenticated(ApiError):
    status_code, code = 401, "unauthenticated"


class Forbidden(ApiError):
    status_code, code = 403, "forbidden"


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class Conflict(ApiError):
    status_code, code = 409, "conflict"


class Gone(ApiError):
    """410: the resource is known but its bytes are not served (deleted, or superseded)."""

    status_code, code = 410, "gone"


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class TooManyRequests(ApiError):
    """429 with Retry-After: the caller is at a limit that frees up by itself."""

    status_code, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_seconds)}


class ServiceUnavailable(ApiError):
    """503 with Retry-After: a part the service depends on (the artifact store) failed."""

    status_code, code = 503, "unavailable"

    def __init__(self, message: str, retry_after_seconds: int = 5) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_seconds)}


class InvalidRequest(ApiError):
    """422 naming the field at fault."""

    status_code, code = 422, "invalid_request"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", [FieldProblem(field=field, problem=problem)])


class IdempotencyMismatch(ApiError):
    status_code, code = 422, "idempotency_key_reused"


def describe_errors(errors: list[dict], drop_location: bool = True) -> list[FieldProblem]:
    """pydantic's errors as field problems; 'body.forget.ids' becomes 'forget.ids'."""
    problems = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] == "query":  # 'state.0' for a repeated parameter: the name will do
            loc = [part for part in loc if not part.isdigit()]
        if drop_location and loc and loc[0] in {"body", "query", "path", "header", "cookie"}:
            loc = loc[1:] or loc[:1]
        field = ".".join(loc) or "body"
        kind = error.get("type", "")
        if kind == "missing":
            problem = "is required"
        elif kind == "extra_forbidden":
            problem = "is not a known field"
        elif kind == "json_invalid":
            field, problem = "body", f"is not valid JSON ({error.get('ctx', {}).get('error')})"
        else:
            problem = error.get("msg", "is invalid").removeprefix("Value error, ")
            part, rest = named_part(problem) if kind == "value_error" else (None, problem)
            if part is not None:  # the library's validators name the part at fault first
                within = [] if field == "body" else loc
                if within[-1:] != [part]:
                    field = ".".join([*within, part])
                problem = rest
        problems.append(FieldProblem(field=field, problem=problem))
    return problems


_NAMED_PART = re.compile(r"([a-z_][a-z0-9_.]*): ")


def named_part(message: str) -> tuple[str | None, str]:
    """The library's messages name the part at fault first ('preset: unknown ...'): that
    part and the rest, or None and the whole message."""
    match = _NAMED_PART.match(message)
    return (match[1], message[match.end() :]) if match else (None, message)


def invalid(problems: list[FieldProblem]) -> JSONResponse:
    message = "; ".join(f"{p.field}: {p.problem}" for p in problems)
    body = ErrorResponse(
        error=ErrorDetail(code="invalid_request", message=message, fields=problems)
    )
    return JSONResponse(body.model_dump(), status_code=422)


def from_validation_error(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    """A library model's ValidationError as a 422 naming the first field, under `prefix`."""
    problems = describe_errors(exc.errors(), drop_location=False)
    first = problems[0]
    error = InvalidRequest(f"{prefix}{first.field}" if prefix else first.field, first.problem)
    error.fields = [FieldProblem(field=f"{prefix}{p.field}", problem=p.problem) for p in problems]
    error.message = "; ".join(f"{p.field}: {p.problem}" for p in error.fields)
    return error


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "too_many_requests",
}


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached right now (a transient failure,
    answered 503), as opposed to a statement it refused (a bug, answered 500)."""
    if isinstance(exc, DisconnectionError | PoolTimeout | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
        return exc.response({**headers, **exc.headers} or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        media_type = request.headers.get("content-type", "").partition(";")[0].strip()
        if media_type and "json" not in media_type and any(e["loc"] == ("body",) for e in errors):
            # FastAPI parses a body as JSON only when it is labelled so; any other body would
            # be reported as "Input should be a valid dictionary".
            message = f"send JSON with Content-Type: application/json (not {media_type})"
            body = ErrorResponse(error=ErrorDetail(code="unsupported_media_type", message=message))
            return JSONResponse(body.model_dump(), status_code=415)
        return invalid(describe_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        body = ErrorResponse(error=ErrorDetail(code=code, message=str(exc.detail)))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(DisconnectionError)
    @app.exception_handler(PoolTimeout)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not is_database_unavailable(exc):
            return await _unexpected(request, exc)
        # A dropped connection, a server restarting, a full pool: nothing was committed, and
        # the same request can succeed in a moment.
        log.warning("database unavailable: %s", type(exc).__name__, exc_info=exc)
        message = "the database is unavailable right now; try again after Retry-After seconds"
        body = ErrorResponse(error=ErrorDetail(code="unavailable", message=message))
        retry = str(request.app.state.settings.retry_after_seconds)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": retry})

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        body = ErrorResponse(error=ErrorDetail(code="internal", message="internal server error"))
        return JSONResponse(body.model_dump(), status_code=500)
