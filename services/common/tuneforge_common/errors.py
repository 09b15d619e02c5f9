"""Domain errors. Services raise these; one mapper (grpcutil) turns them into gRPC status codes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base class; the message is safe to show to clients."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class ResourceExhausted(DomainError):
    pass


class Unauthenticated(DomainError):
    """No credential, or one that is unknown, malformed or revoked."""


class PermissionDenied(DomainError):
    """A known caller whose role does not allow the action on an object it can see."""


class InvalidArgument(DomainError):
    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations: list[FieldViolation] = list(violations or [])

    @classmethod
    def for_field(cls, field_name: str, description: str) -> InvalidArgument:
        return cls(f"{field_name}: {description}", [FieldViolation(field_name, description)])


@dataclass
class ViolationCollector:
    """Gathers every violation of a request so the client sees them all at once."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_name: str, description: str) -> None:
        self.violations.append(FieldViolation(field_name, description))

    def raise_if_any(self) -> None:
        if self.violations:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
            raise InvalidArgument(summary, self.violations)


class Unavailable(DomainError):
    """A dependency (another service) cannot be reached; the client may retry."""


# SQLSTATEs of a database that is down, restarting or full of connections: class 08 (connection exception),
# admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def is_unavailable(exc: BaseException) -> bool:
    """The service's database (or a connection it needs) is down or restarting, so the same call may work after a
    retry: a refused or reset connection, a PostgreSQL connection-class SQLSTATE, a SQLAlchemy error whose
    connection was invalidated, or a pool timeout. Recognised by attributes, so no driver is imported here."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ConnectionError) or getattr(err, "connection_invalidated", False):
            return True
        sqlstate = getattr(err, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        if type(err).__module__ == "sqlalchemy.exc" and type(err).__name__ == "TimeoutError":
            return True
        orig = getattr(err, "orig", None)
        todo += [err.__cause__, err.__context__, orig if isinstance(orig, BaseException) else None]
    return False
