"""The one place gRPC status codes become HTTP statuses and JSON error bodies, and where the error bodies are
documented in the OpenAPI document."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from tuneforge_common.grpcutil import decode_error

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

# What a client reads instead of a transport text, by HTTP status (anything else 5xx: "internal error").
GENERIC_MESSAGES = {502: "a backend response was too large", 503: "a backend service is unavailable"}

# The OpenAI-compatible API (openai_compat.py) answers errors in OpenAI's shape instead.
OPENAI_PREFIX = "/v1/"
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}


class FieldViolation(BaseModel):
    field: str = Field(..., description="Dotted path of the request field, e.g. resources.gpu_count")
    description: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # some errors add keys of their own, e.g. an upload's expected_offset

    code: str = Field(..., description="A gRPC status code's name: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION...")
    message: str = Field(..., description="What went wrong, for people")
    field: str | None = Field(..., description="The request field at fault (the first violation's); null if none")
    field_violations: list[FieldViolation] | None = Field(None, description="Every field at fault, when any is")


class ErrorResponse(BaseModel):
    """Every error of the /api/v1 API."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, authentication_error, permission_error, server_error")
    param: str | None = Field(..., description="The request field at fault, if one is")
    code: str | None = Field(..., description="The gRPC status code's name in lower case, e.g. not_found")


class OpenAIErrorResponse(BaseModel):
    """Every error of the OpenAI-compatible /v1 API, in OpenAI's shape."""

    error: OpenAIErrorDetail


ERROR_DESCRIPTIONS: dict[int | str, str] = {
    400: "Invalid request: `field` names what to fix",
    401: "No API key, or one that is unknown or revoked",
    403: "The key's role does not allow this",
    404: "No such resource",
    409: "The resource's state does not allow this now",
    413: "Over a size limit",
    "5XX": "A backend failed, is unavailable (503) or did not answer in time (504)",
}


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: the error body at each status it can answer besides its success, the caller's
    401 and 403 (every call carries the caller's key), and any 5xx."""
    codes: list[int | str] = sorted({*statuses, 401, 403})
    return {status: {"model": model, "description": ERROR_DESCRIPTIONS[status]} for status in [*codes, "5XX"]}


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """error_responses for the OpenAI-compatible API, whose errors have OpenAI's shape."""
    return error_responses(*statuses, model=OpenAIErrorResponse)


def document_errors(app: FastAPI) -> None:
    """FastAPI documents a 422 for each route with inputs, but this gateway answers invalid input with a 400 and
    its error body (validation_error_handler): the document says so instead."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # FastAPI's own cache: this rewrite runs once, and is idempotent anyway
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {
                        "description": ERROR_DESCRIPTIONS[400],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
        schemas = document.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def error_body(
    code: str, message: str, violations: list[tuple[str, str]] | None = None, details: dict | None = None
) -> dict:
    body: dict = {"code": code, "message": message, "field": violations[0][0] if violations else None}
    if violations:
        body["field_violations"] = [{"field": f, "description": d} for f, d in violations]
    body.update(details or {})
    return {"error": body}


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def grpc_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, grpc.aio.AioRpcError)
    decoded = decode_error(exc)
    status = HTTP_STATUS.get(decoded.code, 500)
    if decoded.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not decoded.from_service:
        # gRPC itself refused a message over its size limit (a response too large for the channel): the
        # client's request was fine, so no 413, and the transport text stays here.
        status = 502
    # Transport texts (a service down, a message limit) and INTERNAL never reach clients; a service's own
    # UNAVAILABLE (e.g. the Hugging Face Hub is unreachable) says what to do instead.
    if status < 500 or (status == 503 and decoded.from_service):
        message = decoded.message
    else:
        message = GENERIC_MESSAGES.get(status, "internal error")
    return JSONResponse(error_body(decoded.code.name, message, decoded.field_violations), status_code=status)


REQUEST_PARTS = {"body", "query", "path", "header", "cookie"}


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    violations = []
    for err in exc.errors():
        # The location (body, query, path, header) is not part of the field's name, except for a missing or
        # unreadable body, whose location is all there is.
        loc = [str(part) for part in err["loc"]]
        if err.get("type") == "json_invalid":  # loc is ("body", offset): the body is at fault, at that character
            detail = (err.get("ctx") or {}).get("error", "")
            violations.append(("body", f"not valid JSON at character {loc[-1]}: {detail}".rstrip(": ")))
            continue
        name = ".".join(loc[1:] if loc and loc[0] in REQUEST_PARTS else loc)
        violations.append((name or (loc[0] if loc else "body"), err["msg"]))
    summary = "; ".join(f"{f}: {d}" for f, d in violations)
    return JSONResponse(error_body("INVALID_ARGUMENT", summary, violations), status_code=400)


class ApiError(Exception):
    """An error the gateway itself decides; `details` are extra keys of the error body (e.g. expected_offset)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.details, self.headers = details, headers

    def response(self) -> JSONResponse:
        violations = [(self.field, self.message)] if self.field else None
        return JSONResponse(
            error_body(self.code, self.message, violations, self.details), status_code=self.status, headers=self.headers
        )


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


def allowed_methods(request: Request) -> list[str]:
    """The methods of the routes at this path; where templates overlap (/jobs/compare and /jobs/{job_id}), those
    of the most literal one, the resource the path names."""
    by_template: dict[str, set[str]] = {}
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            by_template.setdefault(route.path, set()).update(route.methods)
    if not by_template:
        return []
    return sorted(by_template[min(by_template, key=lambda template: template.count("{"))])


# Starlette's own refusals, before any route runs: no route at the path, or not this method there.
HTTP_EXCEPTION_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's 404 and 405 (and any other HTTPException) in the error body of the API the path belongs to."""
    assert isinstance(exc, HTTPException)
    status, where = exc.status_code, f"{request.method} {request.url.path}"
    code = HTTP_EXCEPTION_CODES.get(status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")
    message = {404: f"no route {where}", 405: f"{where}: method not allowed"}.get(status, str(exc.detail))
    # A 400 before any route runs is a body that could not be read (FastAPI's JSON or Starlette's multipart
    # parsing): it names the body and says why, instead of "There was an error parsing the body".
    field = "body" if status == 400 else None
    if status == 400 and (why := unreadable_body(exc.__cause__)):
        message = why
    headers = dict(exc.headers or {})
    if status == 405:
        # Starlette names the methods of the first route at this path only; a path may have several routes.
        headers["Allow"] = ", ".join(allowed_methods(request))
    if request.url.path.startswith(OPENAI_PREFIX):
        return openai_error(status, message, field, code.lower(), headers)
    return ApiError(status, code, message, field=field, headers=headers).response()


def unreadable_body(cause: BaseException | None) -> str | None:
    """Why a JSON body could not be parsed, for the exceptions FastAPI reports as a bare 400."""
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, ValueError):  # e.g. a number too long to convert
        return f"the JSON body could not be parsed: {cause}"
    return None


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception: a 500 in the error body of the API the path belongs to, never a traceback or text."""
    if request.url.path.startswith(OPENAI_PREFIX):
        return openai_error(500, "internal error", None, "internal")
    return ApiError(500, "INTERNAL", "internal error").response()
