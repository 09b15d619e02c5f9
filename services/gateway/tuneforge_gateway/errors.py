"""The one place gRPC status codes become HTTP statuses and JSON error bodies."""

from __future__ import annotations

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


def error_body(
    code: str, message: str, violations: list[tuple[str, str]] | None = None, details: dict | None = None
) -> dict:
    body: dict = {"code": code, "message": message}
    if violations:
        body["field_violations"] = [{"field": f, "description": d} for f, d in violations]
        body["field"] = violations[0][0]
    body.update(details or {})
    return {"error": body}


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


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    violations = [(".".join(str(p) for p in err["loc"] if p != "body"), err["msg"]) for err in exc.errors()]
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
