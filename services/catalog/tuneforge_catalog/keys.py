"""Projects, API keys and roles: who may create, see and revoke which keys, and what a key stands for.

Only a key's hash is stored. A project admin manages the keys whose roles lie in projects it administers;
a superuser manages all and creates projects. A key a caller may not manage is NOT_FOUND to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tuneforge_common import auth
from tuneforge_common.auth import DEFAULT_PROJECT, Principal, Role
from tuneforge_common.db import new_id, utcnow
from tuneforge_common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    ViolationCollector,
)

from . import store

MAX_NAME = 255
KINDS = ("user", "service")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Keys:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- authenticating ---------------------------------------------------------

    async def lookup(self, token: str) -> Principal:
        """The principal a user/service key stands for (project not chosen yet); unknown, malformed,
        mismatched and revoked keys are all the same UNAUTHENTICATED, so none can be told apart."""
        parsed = auth.parse_key(token)
        if parsed is None or parsed[0] != auth.USER_PREFIX:
            raise Unauthenticated("invalid API key")
        _, key_id, secret = parsed
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(store.api_keys).where(store.api_keys.c.id == key_id))).first()
            if not auth.stored_credential_valid(row, secret):
                raise Unauthenticated("invalid or revoked API key")
            roles = await self._roles(conn, [key_id])
        return Principal(
            kind=row.kind, key_id=row.id, name=row.name, superuser=row.superuser, roles=roles.get(key_id, {})
        )

    async def authenticate_for_service(self, token: str) -> tuple[Any, dict[str, Role]]:
        """Another TuneForge service asking who a caller is (AuthService.Authenticate)."""
        if not auth.current().internal:
            raise PermissionDenied("only TuneForge services may authenticate other callers' keys")
        principal = await self.lookup(token)
        return await self.get_key_row(principal.key_id)

    async def bootstrap_admin(self, full_key: str) -> bool:
        """Store `full_key` as a superuser admin of the default project when no key exists yet (first start);
        False when keys exist already. The operator chose the key, so no secret is ever printed by us."""
        parsed = auth.parse_key(full_key)
        if parsed is None or parsed[0] != auth.USER_PREFIX:
            raise InvalidArgument.for_field("bootstrap_admin_key", "must look like tf_<id>_<secret> (new_key())")
        _, key_id, secret = parsed
        async with self.engine.begin() as conn:
            if (await conn.execute(select(func.count()).select_from(store.api_keys))).scalar_one():
                return False
            await self._ensure_default_project(conn)
            await conn.execute(
                insert(store.api_keys).values(
                    id=key_id,
                    name="admin",
                    kind="user",
                    secret_hash=auth.hash_secret(secret),
                    superuser=True,
                    created_by="",
                    created_at=utcnow(),
                )
            )
            await conn.execute(
                insert(store.key_roles).values(key_id=key_id, project_id=DEFAULT_PROJECT, role=int(Role.ADMIN))
            )
        return True

    @staticmethod
    async def _ensure_default_project(conn: AsyncConnection) -> None:
        exists = (await conn.execute(select(store.projects.c.id).where(store.projects.c.id == DEFAULT_PROJECT))).first()
        if not exists:
            await conn.execute(
                insert(store.projects).values(id=DEFAULT_PROJECT, name=DEFAULT_PROJECT, created_at=utcnow())
            )

    # -- projects -----------------------------------------------------------------

    async def create_project(self, name: str) -> Any:
        caller = auth.current()
        if not caller.superuser:
            raise PermissionDenied("creating a project needs a superuser key")
        if not PROJECT_NAME.match(name or ""):
            raise InvalidArgument.for_field(
                "name", "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        project_id = new_id("prj")
        async with self.engine.begin() as conn:
            if (await conn.execute(select(store.projects.c.id).where(store.projects.c.name == name))).first():
                raise AlreadyExists(f"a project named {name!r} exists")
            await conn.execute(insert(store.projects).values(id=project_id, name=name, created_at=utcnow()))
        return await self._project(project_id)

    async def _project(self, project_id: str) -> Any:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(store.projects).where(store.projects.c.id == project_id))).first()
        if row is None:
            raise NotFound(f"project {project_id!r} not found")
        return row

    async def list_projects(self, page_size: int, page_token: str) -> tuple[list[Any], str]:
        caller = auth.current()
        conditions = [] if caller.superuser else [store.projects.c.id.in_(list(caller.roles))]
        order = [store.projects.c.created_at, store.projects.c.id]
        return await store.list_page(self.engine, store.projects, page_size, page_token, order, conditions)

    # -- keys -----------------------------------------------------------------------

    async def create_key(
        self, name: str, kind: str, roles: Mapping[str, Role], superuser: bool
    ) -> tuple[Any, dict[str, Role], str]:
        """(the stored key, its roles, the full key to show once)."""
        caller = auth.current()
        problems = ViolationCollector()
        if not name.strip() or len(name) > MAX_NAME:
            problems.add("name", f"is required, at most {MAX_NAME} characters")
        if kind not in KINDS:
            problems.add("kind", f"must be one of {', '.join(KINDS)}")
        if not roles and not superuser:
            problems.add("roles", "give at least one project role (or superuser)")
        problems.raise_if_any()
        if superuser and not caller.superuser:
            raise PermissionDenied("only a superuser key creates superuser keys")
        for project_id in roles:
            if not caller.superuser and caller.roles.get(project_id) != Role.ADMIN:
                if project_id in caller.roles:
                    raise PermissionDenied(f"creating keys for project {project_id!r} needs the admin role there")
                raise NotFound(f"project {project_id!r} not found")
            await self._project(project_id)
        key_id, full_key, secret_hash = auth.new_key()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(store.api_keys).values(
                    id=key_id,
                    name=name.strip(),
                    kind=kind,
                    secret_hash=secret_hash,
                    superuser=superuser,
                    created_by=caller.key_id,
                    created_at=utcnow(),
                )
            )
            for project_id, role in roles.items():
                await conn.execute(insert(store.key_roles).values(key_id=key_id, project_id=project_id, role=int(role)))
        row, key_roles = await self.get_key_row(key_id)
        return row, key_roles, full_key

    def _manageable(self) -> list[Any]:
        """Conditions on api_keys: the keys the caller may see and revoke."""
        caller = auth.current()
        if caller.superuser:
            return []
        administered = [p for p, r in caller.roles.items() if r == Role.ADMIN]
        in_administered = select(store.key_roles.c.key_id).where(store.key_roles.c.project_id.in_(administered))
        outside = select(store.key_roles.c.key_id).where(store.key_roles.c.project_id.not_in(administered))
        # A key that also holds a role elsewhere belongs partly to another admin: not this one's to manage.
        manageable = (
            store.api_keys.c.id.in_(in_administered) & store.api_keys.c.id.not_in(outside) & ~store.api_keys.c.superuser
        )
        return [manageable | (store.api_keys.c.id == caller.key_id)]

    async def list_keys(
        self, page_size: int, page_token: str, include_revoked: bool
    ) -> tuple[list[tuple[Any, dict[str, Role]]], str]:
        conditions = self._manageable()
        if not include_revoked:
            conditions.append(store.api_keys.c.revoked_at.is_(None))
        order = [store.api_keys.c.created_at, store.api_keys.c.id]
        rows, token = await store.list_page(self.engine, store.api_keys, page_size, page_token, order, conditions)
        async with self.engine.connect() as conn:
            roles = await self._roles(conn, [r.id for r in rows])
        return [(r, roles.get(r.id, {})) for r in rows], token

    async def get_key_row(self, key_id: str) -> tuple[Any, dict[str, Role]]:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(store.api_keys).where(store.api_keys.c.id == key_id))).first()
            if row is None:
                raise NotFound(f"API key {key_id!r} not found")
            roles = await self._roles(conn, [key_id])
        return row, roles.get(key_id, {})

    async def revoke_key(self, key_id: str) -> tuple[Any, dict[str, Role]]:
        async with self.engine.begin() as conn:
            query = select(store.api_keys.c.id).where(store.api_keys.c.id == key_id, *self._manageable())
            if (await conn.execute(query)).first() is None:
                raise NotFound(f"API key {key_id!r} not found")
            await conn.execute(
                update(store.api_keys)
                .where(store.api_keys.c.id == key_id, store.api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return await self.get_key_row(key_id)

    @staticmethod
    async def _roles(conn: AsyncConnection, key_ids: list[str]) -> dict[str, dict[str, Role]]:
        found: dict[str, dict[str, Role]] = {}
        if not key_ids:
            return found
        query = select(store.key_roles).where(store.key_roles.c.key_id.in_(key_ids))
        rows = await conn.execute(query.order_by(store.key_roles.c.project_id))
        for r in rows:
            found.setdefault(r.key_id, {})[r.project_id] = Role(r.role)
        return found
