"""Page tokens and proto value helpers shared by every list call."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from .errors import InvalidArgument


def page_size(requested: int, default: int, maximum: int) -> int:
    if requested < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    return min(requested or default, maximum)


def encode_token(position: int) -> str:
    """Opaque to clients: an offset or the last id seen, depending on the list."""
    return base64.urlsafe_b64encode(f"p:{position}".encode()).decode()


def decode_token(token: str, field: str = "page_token") -> int:
    if not token:
        return 0
    try:
        kind, value = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        position = int(value)
        if kind != "p" or position < 0:
            raise ValueError
        return position
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.for_field(field, "invalid page token") from None


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out
