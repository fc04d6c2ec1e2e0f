"""Errors as RFC 9457 problem details (`application/problem+json`), every one of them.

Each `detail` tells a person what to do next. None carries a stack trace or a server path: unexpected errors
are logged here and answered with a generic 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
# Seconds a client is told to wait when the job database is unreachable: a restart takes about that long.
DATABASE_RETRY_AFTER = 30


class FieldError(BaseModel):
    field: str = Field(description="the request field, dotted: `params.epochs`, `limit`, `model`")
    message: str


class Problem(BaseModel):
    """An error, as RFC 9457 describes it."""

    type: str = Field(default="about:blank", description="`about:blank`: the status code says it all")
    title: str = Field(description="the HTTP status phrase", examples=["Conflict"])
    status: int = Field(examples=[409])
    detail: str = Field(
        description="what went wrong and what to do about it",
        examples=["job 0192f3a4c5d6e7f8a9b0c1d2e3f4a5b6 is running: its metrics exist once it has succeeded"],
    )
    instance: str = Field(description="the path of the request that failed", examples=["/jobs/0192.../model"])
    errors: list[FieldError] | None = Field(default=None, description="each invalid field (422 only)")


class ProblemError(Exception):
    """Raise to answer with a problem; `headers` go with it (Allow, WWW-Authenticate, Content-Range)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None,
                 errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.errors = status, detail, headers, errors


def problem_response(request: Request, status: int, detail: str, headers: dict[str, str] | None = None,
                     errors: list[FieldError] | None = None) -> JSONResponse:
    problem = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail,
                      instance=request.url.path, errors=errors)
    return JSONResponse(problem.model_dump(exclude_none=True), status_code=status, headers=headers,
                        media_type=MEDIA_TYPE)


def field_name(location: Sequence[Any]) -> str:
    """A pydantic error location as a person names the field: ('query', 'limit') -> 'limit'."""
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def field_errors(errors: Sequence[Any], *within: str) -> list[FieldError]:
    """Pydantic's errors, each named by its field (under `within`, the form field they came in), a
    validator's own words without pydantic's "Value error, " before them."""
    return [FieldError(field=field_name((*within, *error["loc"])), message=error["msg"].removeprefix("Value error, "))
            for error in errors]


def invalid(errors: list[FieldError]) -> ProblemError:
    """A 422 whose detail names every invalid field."""
    return ProblemError(422, "; ".join(f"{error.field}: {error.message}" for error in errors), errors=errors)


async def _on_problem(request: Request, error: ProblemError) -> JSONResponse:
    return problem_response(request, error.status, error.detail, error.headers, error.errors)


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404 and 405 (no such route, wrong method) with a detail that helps."""
    if error.status_code == 404:
        detail = f"there is nothing at {request.url.path}; the API is described at /docs"
    elif error.status_code == 405:
        said = {k.lower(): v for k, v in (error.headers or {}).items()}.get("allow", "")
        allowed = _allowed(request) or ", ".join(sorted(method.strip() for method in said.split(",")))
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return problem_response(request, 405, detail, {"Allow": allowed})
    else:
        detail = str(error.detail)
    return problem_response(request, error.status_code, detail, error.headers)


def _allowed(request: Request) -> str:
    """The methods of every operation at the request's path, by the OpenAPI description: Starlette's 405
    names those of the first route it matched alone (GET of /jobs/{id}, whose DELETE is another route)."""
    methods = set()
    for template, operations in request.app.openapi()["paths"].items():
        pattern = "/".join("[^/]+" if part.startswith("{") else re.escape(part) for part in template.split("/"))
        if re.fullmatch(pattern, request.url.path):
            methods.update(method.upper() for method in operations)
    return ", ".join(sorted(methods))


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return await _on_problem(request, invalid(field_errors(error.errors())))


def _database_down(error: DBAPIError) -> bool:
    """Whether the database failed to answer, rather than refused a statement (a missing table, a timeout, a
    deadlock: the driver calls those operational too). PostgreSQL: no answer at all (psycopg gives no
    SQLSTATE when it cannot connect), a connection exception (class 08) or a server shutting down or starting
    (57P01-57P03). SQLite: a file that is busy, locked or cannot be opened."""
    if error.connection_invalidated:
        return True
    name = getattr(error.orig, "sqlite_errorname", None)
    if name is not None:
        return name in ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN")
    state = getattr(error.orig, "sqlstate", None)
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


async def _on_database_down(request: Request, error: DBAPIError) -> JSONResponse:
    """The job database unreachable (a restart, a network fault): the service's passing state, said as a 503
    a client waits out, where a 500 told it to report a bug. `nad submit` retries a 503. Any other error of
    the database is the service's fault, a 500."""
    if not _database_down(error):
        return await _on_unexpected(request, error)
    log.error("%s %s: the job database failed", request.method, request.url.path, exc_info=error)
    return problem_response(request, 503, "the job database is unreachable right now; try again in a minute",
                            {"Retry-After": str(DATABASE_RETRY_AFTER)})


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return problem_response(request, 500, "the server hit an internal error; try again, and if it persists "
                                          "report the time of the request to the service's operators")


def install(app: FastAPI) -> None:
    """Route every error of `app` through the handlers above."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    for down in (OperationalError, InterfaceError):  # the driver's errors of a connection, not of a query
        app.add_exception_handler(down, _on_database_down)
    app.add_exception_handler(Exception, _on_unexpected)


def response_header(description: str, required: bool = True, kind: str = "string") -> dict[str, Any]:
    """A response header, as the OpenAPI description declares one."""
    return {"description": description, "required": required, "schema": {"type": kind}}


# The headers a problem of these statuses comes with, for the OpenAPI description.
PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    429: {"Retry-After": response_header("seconds to wait before sending the job again", kind="integer")},
    503: {"Retry-After": response_header("seconds to wait: sent with a job endpoint's 503 while the job "
                                         "database is unreachable", required=False, kind="integer")},
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that may answer with these problems, for the OpenAPI description."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {status: {"description": HTTPStatus(status).phrase, "content": {MEDIA_TYPE: {"schema": schema}},
                     **({"headers": PROBLEM_HEADERS[status]} if status in PROBLEM_HEADERS else {})}
            for status in statuses}
