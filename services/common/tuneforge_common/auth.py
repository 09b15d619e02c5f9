"""Who is calling: API keys, the principal behind one, the project a call acts in, and the gRPC
interceptors that check and carry them.

A key is `<prefix>_<key id>_<secret>` (prefix `tf` for people and programs, `tfa` for trainer agents); only
sha256(secret) is stored, so a leaked database holds no usable key. The secret has 160 random bits, which is
why a fast hash is enough (no password stretching). Services authenticate every call in one server
interceptor, which puts the principal in a context variable that the domain code reads (`current()`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, TypeGuard

import grpc

from .errors import DomainError, NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
PROJECT = "x-tuneforge-project"
USER_PREFIX = "tf"
AGENT_PREFIX = "tfa"
DEFAULT_PROJECT = "default"

# Calls that carry no credential: probes, reflection for generic clients, and an agent's first call.
PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/tuneforge.agent.v1.AgentService/JoinAgent",
    }
)

# The agents' side of the API: only trainer agents' credentials call it, and they call nothing else.
AGENT_SERVICE_PREFIX = "/tuneforge.agent.v1.AgentService/"


class Role(IntEnum):
    """Values equal the proto enum tuneforge.auth.v1.Role; each role includes the ones below it."""

    VIEWER = 1
    MEMBER = 2
    ADMIN = 3


@dataclass(frozen=True)
class Principal:
    """kind: "user" or "service" (API keys), "agent" (a trainer agent's credential), "internal" (another
    TuneForge service, with the shared service token) or "system" (in-process calls with no interceptor)."""

    kind: str
    key_id: str = ""
    name: str = ""
    superuser: bool = False
    roles: Mapping[str, Role] = field(default_factory=dict)
    # The project this call acts in; None only for internal/system callers that act across projects.
    project: str | None = None

    @property
    def internal(self) -> bool:
        """Another TuneForge service or in-process code: trusted with every project."""
        return self.kind in ("internal", "system")

    @property
    def unscoped(self) -> bool:
        return self.internal and self.project is None

    def role(self) -> Role | None:
        if self.internal or self.superuser:
            return Role.ADMIN
        return self.roles.get(self.project or "")

    def require(self, needed: Role, action: str) -> None:
        """PERMISSION_DENIED unless the caller holds `needed` in the project it acts in."""
        if self.kind == "agent":
            raise PermissionDenied(f"{action}: trainer agents can't do this")
        role = self.role()
        if role is None or role < needed:
            raise PermissionDenied(
                f"{action} needs the {needed.name.lower()} role in project {self.project!r}"
                + (f"; this key is {role.name.lower()} there" if role else "")
            )

    def acting_in(self, requested: str) -> Principal:
        """The principal acting in `requested` (or its first project). A project the key has no role in is
        NOT_FOUND, as if it did not exist, so keys can't probe for other teams' projects."""
        if self.internal:
            return replace(self, project=requested or None)
        project = requested or (DEFAULT_PROJECT if self.superuser and not self.roles else next(iter(self.roles), ""))
        if requested and not self.superuser and requested not in self.roles:
            raise NotFound(f"project {requested!r} not found")
        return replace(self, project=project)


SYSTEM = Principal(kind="system", name="system", superuser=True)
_current: ContextVar[Principal] = ContextVar("tuneforge_principal", default=SYSTEM)


def current() -> Principal:
    """The caller of the RPC being served; SYSTEM in code that runs outside an authenticated call."""
    return _current.get()


def act_as(principal: Principal) -> None:
    """Make `principal` the caller for the rest of this task (each RPC runs in its own task)."""
    _current.set(principal)


# -- keys ---------------------------------------------------------------------


def new_key(prefix: str = USER_PREFIX) -> tuple[str, str, str]:
    """(key id, the full key to hand out once, the hash to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_hex(20)
    return key_id, f"{prefix}_{key_id}_{secret}", hash_secret(secret)


def parse_key(token: str) -> tuple[str, str, str] | None:
    """(prefix, key id, secret) of a well-formed key, else None."""
    parts = token.split("_")
    if len(parts) != 3 or parts[0] not in (USER_PREFIX, AGENT_PREFIX) or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison with a configured secret (service token, join token); never equal to ''."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def stored_credential_valid(row: Any | None, secret: str) -> TypeGuard[Any]:
    """A stored key or agent credential row (None when unknown) that is not revoked and matches `secret`."""
    return row is not None and row.revoked_at is None and secret_matches(secret, row.secret_hash)


def bearer(metadata: Mapping[str, str]) -> str:
    scheme, _, token = metadata.get(AUTHORIZATION, "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def credentials_metadata(token: str, project: str | None = None) -> list[tuple[str, str]]:
    metadata = [(AUTHORIZATION, f"Bearer {token}")] if token else []
    return metadata + ([(PROJECT, project)] if project else [])


# -- checking a caller ----------------------------------------------------------

KeyLookup = Callable[[str], Awaitable[Principal]]


class KeyAuthenticator:
    """Turns a call's metadata into a principal.

    The shared service token makes an internal caller (acting in the project it names, or across all);
    agent credentials go to `agent_lookup` (the jobs service owns agents); any other key to `key_lookup`
    (the catalog's key table, directly or through AuthService.Authenticate). Lookups are cached for
    `cache_seconds` by the key's hash, which bounds how long a revoked key keeps working.
    """

    def __init__(
        self,
        key_lookup: KeyLookup,
        service_token: str = "",
        agent_lookup: KeyLookup | None = None,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key_lookup, self.agent_lookup = key_lookup, agent_lookup
        self.service_token, self.cache_seconds, self.clock = service_token, cache_seconds, clock
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def __call__(self, metadata: Mapping[str, str]) -> Principal:
        token = bearer(metadata)
        requested = metadata.get(PROJECT, "").strip()
        if not token:
            raise Unauthenticated("missing API key: send it as 'Authorization: Bearer <key>'")
        if same_secret(token, self.service_token):
            return Principal(kind="internal", name="tuneforge-service", superuser=True, project=requested or None)
        parsed = parse_key(token)
        if parsed is None:
            raise Unauthenticated("invalid API key")
        prefix = parsed[0]
        lookup = self.agent_lookup if prefix == AGENT_PREFIX else self.key_lookup
        if lookup is None:
            raise Unauthenticated("invalid API key")
        principal = await self._cached(token, lookup)
        return principal if principal.kind == "agent" else principal.acting_in(requested)

    async def _cached(self, token: str, lookup: KeyLookup) -> Principal:
        digest = hash_secret(token)
        now = self.clock()
        hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        principal = await lookup(token)
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:  # stale entries of keys no longer used
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[digest] = (now + self.cache_seconds, principal)
        return principal


# -- gRPC interceptors ------------------------------------------------------------

Authenticate = Callable[[Mapping[str, str]], Awaitable[Principal]]


class ServerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but PUBLIC_METHODS must authenticate; its handler then runs as that principal. Agents and
    everyone else keep to their own side: an agent credential calls only the AgentService, and a user's,
    service's or internal key never does (PERMISSION_DENIED before the request is even looked at)."""

    def __init__(self, authenticate: Authenticate, public: Collection[str] = PUBLIC_METHODS) -> None:
        self.authenticate, self.public = authenticate, frozenset(public)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method in self.public:
            return handler
        metadata = {k.lower(): v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:
            principal = await self.authenticate(metadata)
        except Exception as exc:
            from .grpcutil import status_for  # grpcutil imports errors only; a top-level import would cycle

            # Looking the key up may fail too (the database or the catalog restarting): the caller then gets
            # UNAVAILABLE to retry, or INTERNAL, never grpc's UNKNOWN carrying the exception's text.
            if not isinstance(exc, DomainError):
                log.warning("authentication refused a call: %s", type(exc).__name__)
            return _refusing(handler, status_for(exc))
        wrong_side = _wrong_side(principal, details.method)
        if wrong_side:
            from .grpcutil import status_for

            return _refusing(handler, status_for(PermissionDenied(wrong_side)))
        return _running_as(handler, principal)


def _wrong_side(principal: Principal, method: str) -> str:
    """Why `principal` may not call `method` whatever the request says, or '' when it may."""
    agent_rpc = method.startswith(AGENT_SERVICE_PREFIX)
    if principal.kind == "agent" and not agent_rpc:
        return f"{method}: a trainer agent's credential calls only the agent API"
    if principal.kind != "agent" and agent_rpc:
        return f"{method}: the agent API is for trainer agents (they join with a join token), not API keys"
    return ""


def _rebuild(handler: Any, behavior: Any) -> Any:
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _running_as(handler: Any, principal: Principal) -> Any:
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if handler.response_streaming:

        async def streaming(request: Any, context: Any) -> Any:
            act_as(principal)
            async for item in inner(request, context):
                yield item

        return _rebuild(handler, streaming)

    async def unary(request: Any, context: Any) -> Any:
        act_as(principal)
        return await inner(request, context)

    return _rebuild(handler, unary)


def _refusing(handler: Any, status: grpc.Status) -> Any:
    async def abort(request: Any, context: Any) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    if handler.response_streaming:

        async def abort_stream(request: Any, context: Any) -> Any:
            await abort(request, context)
            yield  # pragma: no cover - abort raises

        return _rebuild(handler, abort_stream)
    return _rebuild(handler, abort)


class _AddsMetadata:
    def __init__(self, metadata_for: Callable[[], Sequence[tuple[str, str]]]) -> None:
        self.metadata_for = metadata_for

    def _with_credentials(self, details: Any) -> Any:
        extra = [(k, v) for k, v in self.metadata_for() if k not in {m[0] for m in (details.metadata or ())}]
        return details._replace(metadata=grpc.aio.Metadata(*tuple(details.metadata or ()), *extra))


class _UnaryUnary(_AddsMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_credentials(details), request)


class _UnaryStream(_AddsMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_credentials(details), request)


class _StreamUnary(_AddsMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_credentials(details), request_iterator)


class _StreamStream(_AddsMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_credentials(details), request_iterator)


def call_credentials(metadata_for: Callable[[], Sequence[tuple[str, str]]]) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add `metadata_for()` (read at call time) to every call on a channel: one per
    call shape, as a grpc.aio channel files each interceptor under the first shape it implements only."""
    return [cls(metadata_for) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def service_credentials(service_token: str) -> list[grpc.aio.ClientInterceptor]:
    """For one service calling another: the service token, acting in the project of the call being served
    (so the callee scopes its answer to it), or across projects from background work."""

    def metadata() -> list[tuple[str, str]]:
        caller = current()
        return credentials_metadata(service_token, None if caller.unscoped else caller.project)

    return call_credentials(metadata)
