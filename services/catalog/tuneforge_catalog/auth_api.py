"""AuthService over gRPC: decode, call keys.Keys, encode."""

from __future__ import annotations

from typing import Any

from tuneforge.auth.v1 import auth_pb2 as pb
from tuneforge.auth.v1 import auth_pb2_grpc
from tuneforge_common import auth
from tuneforge_common.auth import Role
from tuneforge_common.auth_client import KIND_NAMES
from tuneforge_common.errors import InvalidArgument
from tuneforge_common.grpcutil import ServiceBinding, map_errors
from tuneforge_common.paging import timestamp

from .keys import Keys

KIND_VALUES = {v: k for k, v in KIND_NAMES.items()}


def key_to_pb(row: Any, roles: dict[str, Role]) -> pb.ApiKey:
    return pb.ApiKey(
        id=row.id,
        name=row.name,
        kind=KIND_VALUES.get(row.kind, pb.PRINCIPAL_KIND_UNSPECIFIED),
        superuser=row.superuser,
        roles=[pb.ProjectRole(project_id=p, role=pb.Role.ValueType(int(r))) for p, r in roles.items()],
        create_time=timestamp(row.created_at),
        revoke_time=timestamp(row.revoked_at) if row.revoked_at else None,
        created_by=row.created_by,
    )


def project_to_pb(row: Any) -> pb.Project:
    return pb.Project(id=row.id, name=row.name, create_time=timestamp(row.created_at))


def _roles(given: Any) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    for i, r in enumerate(given):
        if not r.project_id or r.role not in (1, 2, 3):
            raise InvalidArgument.for_field(f"roles[{i}]", "needs a project_id and a role (viewer, member, admin)")
        roles[r.project_id] = Role(r.role)
    return roles


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    @map_errors
    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.WhoAmIResponse:
        caller = auth.current()
        key = pb.ApiKey(id=caller.key_id, name=caller.name, superuser=caller.superuser)
        if caller.key_id:
            key = key_to_pb(*await self.keys.get_key_row(caller.key_id))
        return pb.WhoAmIResponse(principal=pb.Principal(key=key, project_id=caller.project or ""))

    @map_errors
    async def Authenticate(self, request: pb.AuthenticateRequest, context: Any) -> pb.AuthenticateResponse:
        return pb.AuthenticateResponse(key=key_to_pb(*await self.keys.authenticate_for_service(request.api_key)))

    @map_errors
    async def CreateProject(self, request: pb.CreateProjectRequest, context: Any) -> pb.CreateProjectResponse:
        return pb.CreateProjectResponse(project=project_to_pb(await self.keys.create_project(request.name)))

    @map_errors
    async def ListProjects(self, request: pb.ListProjectsRequest, context: Any) -> pb.ListProjectsResponse:
        rows, token = await self.keys.list_projects(request.page_size, request.page_token)
        return pb.ListProjectsResponse(projects=[project_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Any) -> pb.CreateApiKeyResponse:
        kind = KIND_NAMES.get(request.kind, "user" if not request.kind else "")
        row, roles, secret = await self.keys.create_key(request.name, kind, _roles(request.roles), request.superuser)
        return pb.CreateApiKeyResponse(key=key_to_pb(row, roles), secret=secret)

    @map_errors
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Any) -> pb.ListApiKeysResponse:
        found, token = await self.keys.list_keys(request.page_size, request.page_token, request.include_revoked)
        return pb.ListApiKeysResponse(keys=[key_to_pb(r, roles) for r, roles in found], next_page_token=token)

    @map_errors
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Any) -> pb.RevokeApiKeyResponse:
        return pb.RevokeApiKeyResponse(key=key_to_pb(*await self.keys.revoke_key(request.key_id)))


def binding(keys: Keys) -> ServiceBinding:
    return ServiceBinding(
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
        AuthServicer(keys),
        pb.DESCRIPTOR.services_by_name["AuthService"].full_name,
    )
