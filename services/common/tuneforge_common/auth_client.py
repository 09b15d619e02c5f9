"""Checking a caller's API key from a service that does not own the key table: ask the catalog's
AuthService (with the service token), through a KeyAuthenticator that caches the answer briefly."""

from __future__ import annotations

import grpc

from tuneforge.auth.v1 import auth_pb2, auth_pb2_grpc

from .auth import KeyLookup, Principal, Role
from .errors import Unauthenticated, Unavailable

TIMEOUT_S = 10.0
KIND_NAMES = {auth_pb2.PRINCIPAL_KIND_USER: "user", auth_pb2.PRINCIPAL_KIND_SERVICE: "service"}


def principal_from_key(key: auth_pb2.ApiKey) -> Principal:
    roles = {r.project_id: Role(r.role) for r in key.roles if r.role}
    return Principal(
        kind=KIND_NAMES.get(key.kind, "user"), key_id=key.id, name=key.name, superuser=key.superuser, roles=roles
    )


def remote_key_lookup(channel: grpc.aio.Channel) -> KeyLookup:
    """`channel` reaches the catalog and carries the service token (auth.service_credentials)."""
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def lookup(token: str) -> Principal:
        try:
            resp = await stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=token), timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("invalid or revoked API key") from None
            raise Unavailable("can't check the API key now: the catalog service is unavailable") from None
        return principal_from_key(resp.key)

    return lookup
