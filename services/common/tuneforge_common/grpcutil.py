"""gRPC plumbing shared by the services: the one domain-error mapper, server setup, status decoding."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from prometheus_client import Counter, Histogram, start_http_server

from . import errors
from .tls import TlsConfig, server_credentials

log = logging.getLogger(__name__)

RPCS = Counter("tuneforge_grpc_requests_total", "gRPC requests handled", ["method", "code"])
RPC_SECONDS = Histogram("tuneforge_grpc_request_seconds", "gRPC handling time (streams: whole stream)", ["method"])

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: BaseException) -> grpc.Status:
    """Domain errors keep their message; anything else is INTERNAL with no exception text."""
    if isinstance(exc, errors.DomainError):
        code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
        message = exc.message
    elif errors.is_unavailable(exc):
        # The database is down or restarting: a clear, retryable UNAVAILABLE (HTTP 503), not an internal error.
        code, message = grpc.StatusCode.UNAVAILABLE, "the service's database is unavailable; retry shortly"
    else:
        code, message = grpc.StatusCode.INTERNAL, "internal error"
    violations = list(exc.violations) if isinstance(exc, errors.InvalidArgument) else []
    shown = violations[:MAX_VIOLATIONS]
    if len(violations) > len(shown):
        message = f"{_clip(message, MAX_MESSAGE)} (and {len(violations) - len(shown)} more problems)"
    # The status travels in trailing metadata, which clients refuse past 8 KiB: a request with a thousand bad
    # fields must still get its INVALID_ARGUMENT, so the message and the violations shown are bounded.
    status = status_pb2.Status(code=code.value[0], message=_clip(message, MAX_MESSAGE + 40))
    if shown:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_clip(v.field, MAX_FIELD), description=_clip(v.description, MAX_DESCRIPTION)
                    )
                    for v in shown
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


MAX_VIOLATIONS, MAX_MESSAGE, MAX_FIELD, MAX_DESCRIPTION = 8, 600, 160, 300


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if errors.is_unavailable(exc):
        log.warning("RPC refused, the database is unavailable: %s", type(exc).__name__)
    elif not isinstance(exc, errors.DomainError):
        log.exception("unhandled error in RPC", exc_info=exc)
    st = status_for(exc)
    await context.abort(st.code, st.details, st.trailing_metadata)


def nul_field(message: Message, path: str = "") -> str | None:
    """The path (`labels.team`, `job_ids[1]`, `parameters.lr`) of the first string in `message`, map keys and
    Struct values included, that holds a NUL character, which PostgreSQL's text cannot store; None if none does."""
    return _field_where(message, path, _has_nul)


def non_finite_field(message: Message, path: str = "") -> str | None:
    """The path of the first number of a Struct (or a Value) in `message` that is NaN or infinite: JSON has no such
    numbers, so the Struct cannot be written out again (MessageToDict raises). Plain double fields may hold them
    (a diverged run's NaN loss is a fact to report)."""
    return _field_where(message, path, _not_finite)


def unknown_enum_field(message: Message, path: str = "") -> str | None:
    """The path of the first enum field in `message` holding a number its enum does not define (proto3 keeps
    unknown numbers, and a lookup of their name raises), or None."""
    for fd, value in message.ListFields():
        where = f"{path}.{fd.name}" if path else fd.name
        if fd.enum_type is not None:
            values = value if fd.is_repeated else [value]
            if any(v not in fd.enum_type.values_by_number for v in values):
                return where
        elif fd.message_type is not None and not fd.message_type.full_name.startswith("google.protobuf."):
            if fd.message_type.GetOptions().map_entry:
                items = [v for v in value.values() if isinstance(v, Message)]
            else:
                items = list(value) if fd.is_repeated else [value]
            if found := next((f for item in items if (f := unknown_enum_field(item, where))), None):
                return found
    return None


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\0" in value


def _not_finite(value: Any) -> bool:
    return (
        isinstance(value, Message)
        and value.DESCRIPTOR.full_name == "google.protobuf.Value"
        and value.WhichOneof("kind") == "number_value"
        and not math.isfinite(value.number_value)  # type: ignore[attr-defined]
    )


def _field_where(message: Message, path: str, bad: Callable[[Any], bool]) -> str | None:
    kind = message.DESCRIPTOR.full_name
    if kind == "google.protobuf.Struct":
        return _bad_in_items(message.fields.items(), path, bad)  # type: ignore[attr-defined]
    if kind == "google.protobuf.ListValue":
        return _bad_in_items(enumerate(message.values), path, bad)  # type: ignore[attr-defined]
    if kind == "google.protobuf.Value":
        held = message.WhichOneof("kind")
        return _bad_in_items([(None, getattr(message, held))], path, bad) if held else None
    for fd, value in message.ListFields():
        where = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            found = _bad_in_items(value.items(), where, bad)
        else:
            found = _bad_in_items(enumerate(value) if fd.is_repeated else [(None, value)], where, bad)
        if found:
            return found
    return None


def _bad_in_items(items: Iterable[tuple[Any, Any]], path: str, bad: Callable[[Any], bool]) -> str | None:
    """Items of a map (str keys), a list (int keys) or one value (key None), at `path`."""
    for key, value in items:
        if isinstance(key, str) and bad(key):
            return path
        where = path if key is None else f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
        if bad(value):
            return where
        if isinstance(value, Message) and (found := _field_where(value, where, bad)):
            return found
    return None


def _refuse_nul(request: Any) -> None:
    # A NUL in a string would reach the database and fail there as an internal error; it is the caller's mistake.
    if isinstance(request, Message) and (field := nul_field(request)):
        raise errors.InvalidArgument.for_field(field, "must not contain NUL characters")
    # So would a NaN or an infinity in parameters, once written out as JSON (a 1e999 in a request body is one).
    if isinstance(request, Message) and (field := non_finite_field(request)):
        raise errors.InvalidArgument.for_field(field, "must be a finite number")
    if isinstance(request, Message) and (field := unknown_enum_field(request)):
        raise errors.InvalidArgument.for_field(field, "is not one of the enum's values")


async def _each_refusing_nul(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages, each checked as a unary request is."""
    async for request in requests:
        _refuse_nul(request)
        yield request


def map_errors(fn: Callable) -> Callable:
    """Decorate a servicer method (coroutine or async generator): domain errors become status codes, and
    every call is counted and timed for Prometheus. A request with a NUL character in a string is refused."""
    method = fn.__name__

    def observe(started: float, code: grpc.StatusCode) -> None:
        RPCS.labels(method, code.name).inc()
        RPC_SECONDS.labels(method).observe(time.perf_counter() - started)

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                _refuse_nul(request)
                async for item in fn(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                code = grpc.StatusCode.ABORTED
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = status_for(exc).code
                await _abort(context, exc)
            finally:
                observe(started, code)

        return gen_wrapper

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            _refuse_nul(request)
            if not isinstance(request, Message):  # a client stream (UploadDataset)
                request = _each_refusing_nul(request)
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            code = grpc.StatusCode.ABORTED
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_for(exc).code
            await _abort(context, exc)
        finally:
            observe(started, code)

    return wrapper


def serve_metrics(port: int, host: str) -> int | None:
    """Prometheus /metrics on its own HTTP port; negative disables it, 0 picks a free port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]


@dataclass
class ServiceBinding:
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


async def start_server(
    bindings: Iterable[ServiceBinding],
    host: str,
    port: int,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    *,
    tls: TlsConfig | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with health checking and reflection; port 0 picks a free port. It listens with TLS
    (mTLS when tls.require_client_cert) when tls is enabled, else plaintext."""
    credentials = server_credentials(tls)  # before the server exists: a bad file fails the start, naming its setting
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
    bindings = list(bindings)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for b in bindings:
        b.add_to_server(b.servicer, server)
    names = [b.full_name for b in bindings] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    for b in bindings:
        await health_servicer.set(b.full_name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


@dataclass
class DecodedError:
    code: grpc.StatusCode
    message: str
    field_violations: list[tuple[str, str]]
    # True when a TuneForge service wrote the status (its message is safe to show); False for transport errors.
    from_service: bool = False


def decode_error(err: grpc.aio.AioRpcError) -> DecodedError:
    """Read code, message and BadRequest field violations from a failed call."""
    violations: list[tuple[str, str]] = []
    from_service = False
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            from_service = True
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    detail.Unpack(br)
                    violations += [(v.field, v.description) for v in br.field_violations]
    return DecodedError(err.code(), err.details() or "", violations, from_service)


assert code_pb2.NOT_FOUND == grpc.StatusCode.NOT_FOUND.value[0]
