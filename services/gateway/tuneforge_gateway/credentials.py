"""The caller's credentials, carried from an HTTP request to the gRPC calls made for it.

Every HTTP request's `Authorization` header (and project: `X-TuneForge-Project`, or `OpenAI-Project` as the
official OpenAI client sends it) becomes the metadata of the gRPC calls made while serving it, so the services
check the caller's own key: the gateway holds no authority of its own over users' objects. Outside any
request (the shared upstream of a job's SSE watchers) the gateway's service token is used instead.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar

from grpc.aio import ClientInterceptor
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tuneforge_common.auth import AUTHORIZATION, PROJECT, call_credentials, credentials_metadata

PROJECT_HEADERS = ("x-tuneforge-project", "openai-project")

# None outside a request; a list (empty when the request had no key) inside one.
_caller: ContextVar[list[tuple[str, str]] | None] = ContextVar("tuneforge_gateway_caller", default=None)


class CallerCredentials:
    """ASGI middleware: remember the request's credentials for the gRPC calls made while serving it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            metadata = [(AUTHORIZATION, headers[AUTHORIZATION])] if AUTHORIZATION in headers else []
            project = next((headers[h] for h in PROJECT_HEADERS if headers.get(h)), "")
            if project:
                metadata.append((PROJECT, project))
            _caller.set(metadata)
        await self.app(scope, receive, send)


def caller_fingerprint() -> str:
    """Stands for the caller's key and project without holding the key (for objects the gateway keeps)."""
    caller = _caller.get() or []
    return hashlib.sha256(repr(sorted(caller)).encode()).hexdigest()


def backend_credentials(service_token: str) -> list[ClientInterceptor]:
    def metadata() -> list[tuple[str, str]]:
        caller = _caller.get()
        return credentials_metadata(service_token) if caller is None else caller

    return call_credentials(metadata)
