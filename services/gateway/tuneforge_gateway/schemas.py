"""The JSON form of protobuf messages in the HTTP API (to_json), and the JSON Schema of exactly that form.

to_json is MessageToDict (proto field names, every field without presence printed) tidied for HTTP clients:
64-bit integers as numbers, enum names without their type prefix (null when unspecified), integral numbers at
the top of a Struct as integers. message_schema derives from a message's descriptor the JSON Schema of what
to_json writes for it, so the OpenAPI document declares a route's body without a schema written per message.

Each message is a component of the document named by its full proto name (tuneforge.jobs.v1.Job), which the
other messages reference with $ref, so reuse and recursion cost nothing. A route declares its body with
`response_model=message_body(jpb.Job)`; document_bodies adds the components the document references.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import FastAPI
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from pydantic import BaseModel, WithJsonSchema

COMPONENTS = "#/components/schemas/"

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
# Enums whose HTTP names are lower case (the others keep their upper case names: "RUNNING", "READY").
_LOWER_CASE_ENUMS = ("DatasetFormat", "ParameterType", "Role", "PrincipalKind")


# -- the JSON form ---------------------------------------------------------------------------------------------


def to_json(message: Any) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _tidy(message.DESCRIPTOR, data)


def enum_json_name(enum: EnumDescriptor, name: str) -> str | None:
    """An enum value's HTTP name: without its type's prefix, null for the UNSPECIFIED value."""
    if name.endswith("_UNSPECIFIED"):
        return None
    # Buf style: each value starts with its enum's name in upper snake case (JobKind: JOB_KIND_MERGE).
    name = name.removeprefix(re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_")
    return name.lower() if enum.name in _LOWER_CASE_ENUMS else name


def _tidy(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    """HTTP-friendly JSON: 64-bit integers as numbers, enum names without their type prefix (null when unset),
    and integral parameter values as integers (protobuf Struct carries every number as a double)."""
    for fd in descriptor.fields:
        if fd.name not in data:
            continue
        value = data[fd.name]
        if entry := _map_entry(fd):
            value_field = entry.fields_by_name["value"]
            data[fd.name] = {k: _tidy_value(value_field, v) for k, v in value.items()}
        elif fd.is_repeated:
            data[fd.name] = [_tidy_value(fd, v) for v in value]
        else:
            data[fd.name] = _tidy_value(fd, value)
    return data


def _tidy_value(fd: FieldDescriptor, value: Any) -> Any:
    """One value of a field (one item of a repeated field, one value of a map) as to_json writes it."""
    if fd.type in _INT64:
        return int(value)
    if fd.enum_type is not None and isinstance(value, str):
        return enum_json_name(fd.enum_type, value)
    if fd.message_type is None or not isinstance(value, dict):
        return value
    if fd.message_type.full_name == "google.protobuf.Struct":
        return _int_values(value)
    if fd.message_type.full_name.startswith("google.protobuf."):
        return value
    return _tidy(fd.message_type, value)


def _int_values(struct: dict[str, Any]) -> dict[str, Any]:
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in struct.items()}


def _map_entry(fd: FieldDescriptor) -> Descriptor | None:
    """A map field's entry type (its key and value fields); None for any other field."""
    entry = fd.message_type
    return entry if entry is not None and entry.GetOptions().map_entry else None


# -- its JSON Schema -------------------------------------------------------------------------------------------

# MessageToDict writes a double or float that is not finite as one of these strings.
DOUBLE: dict[str, Any] = {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]}
_BASE64 = {"type": "string", "contentEncoding": "base64"}
# Well-known types as MessageToDict writes them (_tidy leaves them alone, except a Struct's top-level numbers).
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object", "maxProperties": 0},
    "google.protobuf.Any": {"type": "object", "required": ["@type"]},
    "google.protobuf.DoubleValue": DOUBLE,
    "google.protobuf.FloatValue": DOUBLE,
    "google.protobuf.Int64Value": {"type": "string", "pattern": "^-?[0-9]+$"},
    "google.protobuf.UInt64Value": {"type": "string", "pattern": "^[0-9]+$"},
    "google.protobuf.Int32Value": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    "google.protobuf.UInt32Value": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": _BASE64,
}
_SIGNED, _UNSIGNED = {"type": "integer"}, {"type": "integer", "minimum": 0}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: DOUBLE,
    FieldDescriptor.TYPE_FLOAT: DOUBLE,
    FieldDescriptor.TYPE_INT32: {**_SIGNED, "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_SINT32: {**_SIGNED, "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_SFIXED32: {**_SIGNED, "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_UINT32: {**_UNSIGNED, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_FIXED32: {**_UNSIGNED, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_INT64: {**_SIGNED, "minimum": -(2**63), "maximum": 2**63 - 1},
    FieldDescriptor.TYPE_SINT64: {**_SIGNED, "minimum": -(2**63), "maximum": 2**63 - 1},
    FieldDescriptor.TYPE_SFIXED64: {**_SIGNED, "minimum": -(2**63), "maximum": 2**63 - 1},
    FieldDescriptor.TYPE_UINT64: {**_UNSIGNED, "maximum": 2**64 - 1},
    FieldDescriptor.TYPE_FIXED64: {**_UNSIGNED, "maximum": 2**64 - 1},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: _BASE64,
}
# How MessageToDict writes a map's keys, by the key field's type (JSON object keys are strings).
_MAP_KEYS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_BOOL: {"enum": ["true", "false"]},
    **{t: {"pattern": "^-?[0-9]+$"} for t, schema in _SCALARS.items() if schema.get("type") == "integer"},
}


def message_ref(message: Any) -> dict[str, Any]:
    """A reference to the component of a message type (a class or its descriptor): the component comes with
    message_schemas, or in the document with document_bodies. Well-known types are their schema itself."""
    descriptor = getattr(message, "DESCRIPTOR", message)
    if descriptor.full_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[descriptor.full_name])
    if descriptor.full_name.startswith("google.protobuf."):
        raise ValueError(f"no JSON Schema for {descriptor.full_name}")
    return {"$ref": COMPONENTS + descriptor.full_name}


def message_schema(message: Any, extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON Schema of to_json of a message of this type (a class or its descriptor), with `extra` properties
    (always there) for a body that adds keys of its own. Other messages are $refs to their components."""
    descriptor = getattr(message, "DESCRIPTOR", message)
    properties = {fd.name: _field_schema(fd) for fd in descriptor.fields} | (extra or {})
    # Fields without presence (scalars, enums, repeated fields and maps) are always printed; messages, oneof
    # members and optional fields only when set.
    required = [fd.name for fd in descriptor.fields if not fd.has_presence] + list(extra or {})
    schema: dict[str, Any] = {"type": "object", "title": descriptor.name, "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    # A oneof's members: at most one is there (a proto3 `optional` field is a oneof of its own).
    oneofs = [[fd.name for fd in oneof.fields] for oneof in descriptor.oneofs if len(oneof.fields) > 1]
    if oneofs:
        schema["allOf"] = [{"not": {"anyOf": [{"required": pair} for pair in _pairs(names)]}} for names in oneofs]
    return schema


def message_schemas(descriptor: Descriptor) -> dict[str, dict[str, Any]]:
    """The components a message's schema needs, by name: its own and those of every message it references."""
    found: dict[str, dict[str, Any]] = {}
    pending = [descriptor]
    while pending:
        current = pending.pop()
        if current.full_name in found or current.full_name.startswith("google.protobuf."):
            continue
        found[current.full_name] = message_schema(current)
        values = [entry.fields_by_name["value"] if (entry := _map_entry(fd)) else fd for fd in current.fields]
        pending += [fd.message_type for fd in values if fd.message_type is not None]
    return found


def _field_schema(fd: FieldDescriptor) -> dict[str, Any]:
    if entry := _map_entry(fd):
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        schema: dict[str, Any] = {"type": "object", "additionalProperties": _value_schema(value)}
        if key.type in _MAP_KEYS:
            schema["propertyNames"] = _MAP_KEYS[key.type]
        return schema
    if fd.is_repeated:
        return {"type": "array", "items": _value_schema(fd)}
    return _value_schema(fd)


def _value_schema(fd: FieldDescriptor) -> dict[str, Any]:
    """The schema of one value of the field, as _tidy_value leaves it."""
    if (enum := fd.enum_type) is not None:
        names = [enum_json_name(enum, value.name) for value in enum.values]
        return {"enum": list(dict.fromkeys(names))}
    if fd.message_type is not None:
        return message_ref(fd.message_type)
    return dict(_SCALARS[fd.type])


def _pairs(names: list[str]) -> Iterator[list[str]]:
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            yield [first, second]


# -- in the OpenAPI document -----------------------------------------------------------------------------------

# The pydantic models that model_body declares, by component name (document_bodies adds their schemas).
_MODELS: dict[str, type[BaseModel]] = {}


def json_type(schema: dict[str, Any]) -> Any:
    """A route's `response_model=` for a JSON object of this schema: the document says so, and the route's dict
    is answered as it is (FastAPI checks only that it is a dict)."""
    return Annotated[dict[str, Any], WithJsonSchema(schema)]


def message_body(message: Any, extra: dict[str, dict[str, Any]] | None = None) -> Any:
    """`response_model=` for a route whose body is to_json of a message of this type (a class or its descriptor),
    with `extra` keys of its own when given."""
    return json_type(message_schema(message, extra) if extra else message_ref(message))


def model_body(model: type[BaseModel]) -> Any:
    """`response_model=` for a route whose body (a dict it builds) has the shape of this pydantic model. Only the
    document uses the model: the answer is not run through it, so declaring a shape never changes one."""
    if _MODELS.setdefault(model.__name__, model) is not model:
        raise ValueError(f"two models named {model.__name__}")
    return json_type({"$ref": COMPONENTS + model.__name__})


def json_body(schema: dict[str, Any], status: int = 200, description: str = "Success") -> dict[int | str, Any]:
    """`responses=` for a JSON body of this schema at another status than the route's own."""
    return {status: {"description": description, "content": {"application/json": {"schema": schema}}}}


def document_bodies(app: FastAPI) -> None:
    """Add to the app's OpenAPI document the components its bodies reference: messages (message_ref) and the
    models of model_body."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # FastAPI's own cache: this runs once, and is idempotent anyway
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name in sorted(set(_refs(document)) - set(schemas)):
            for component, schema in _components(name).items():
                if schemas.setdefault(component, schema) != schema:
                    raise ValueError(f"two schemas named {component}")
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _components(name: str) -> dict[str, dict[str, Any]]:
    """The components of a message's or a model's schema (its own and those it references), by name."""
    if name in _MODELS:
        schema = _MODELS[name].model_json_schema(ref_template=COMPONENTS + "{model}", mode="serialization")
        nested = schema.pop("$defs", {})
        return {name: schema, **nested}
    try:
        return message_schemas(descriptor_pool.Default().FindMessageTypeByName(name))
    except KeyError:
        return {}  # FastAPI's own component


def _refs(node: Any) -> Iterator[str]:
    """The component names referenced anywhere under `node`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(COMPONENTS):
            yield ref.removeprefix(COMPONENTS)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)
