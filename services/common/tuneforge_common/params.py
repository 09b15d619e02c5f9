"""Resolve user-supplied hyperparameters against a method's schema (pure, no I/O)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ViolationCollector
from .methods import env_name

TYPE_NAMES = ("int", "float", "bool", "string")
_PY_TYPES = {
    int: "int",
    float: "float",
    bool: "bool",
    str: "string",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "string",
}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # one of TYPE_NAMES
    help: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    group: str = "basic"
    required: bool = False

    @property
    def env_name(self) -> str:
        return env_name(self.name)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["choices"] = list(self.choices)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParamSpec:
        return cls(**{**data, "choices": tuple(data.get("choices", ())), "aliases": tuple(data.get("aliases", ()))})


def specs_from_dataclass(params_cls: type) -> list[ParamSpec]:
    specs = []
    for f in dataclasses.fields(params_cls):
        meta = f.metadata
        specs.append(
            ParamSpec(
                name=f.name,
                type=_PY_TYPES[f.type if isinstance(f.type, str) else f.type],
                help=meta.get("help", ""),
                default=None if f.default is dataclasses.MISSING else f.default,
                minimum=meta.get("min"),
                maximum=meta.get("max"),
                choices=tuple(meta.get("choices", ())),
                aliases=tuple(meta.get("aliases", ())),
                group=meta.get("group", "basic"),
                required=f.default is dataclasses.MISSING,
            )
        )
    return specs


def parse_bool(value: Any) -> bool:
    """Explicit boolean parsing: never bool("false") == True."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def coerce(spec: ParamSpec, value: Any) -> Any:
    """Convert a JSON or flag value to the spec's type; ValueError says why not."""
    if spec.type == "bool":
        return parse_bool(value)
    if spec.type == "int":
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected an integer, got {value}")
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    if spec.type == "float":
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError("expected a string")
    return str(value)


def check_range(spec: ParamSpec, value: Any) -> str | None:
    if spec.choices and value not in spec.choices:
        return f"must be one of {', '.join(spec.choices)}"
    if spec.type in ("int", "float"):
        if spec.minimum is not None and value < spec.minimum:
            return f"must be >= {_fmt(spec.minimum)}, got {value}"
        if spec.maximum is not None and value > spec.maximum:
            return f"must be <= {_fmt(spec.maximum)}, got {value}"
    return None


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def resolve_parameters(
    specs: list[ParamSpec], given: dict[str, Any], field_prefix: str = "parameters"
) -> dict[str, Any]:
    """Canonical names, coerced types, ranges checked, defaults filled.

    Raises InvalidArgument listing every bad field as `parameters.<name>`.
    """
    by_name = {s.name: s for s in specs}
    alias_to_name = {alias: s.name for s in specs for alias in s.aliases}
    errors = ViolationCollector()
    resolved: dict[str, Any] = {}
    for key, raw in given.items():
        name = by_name.get(key) and key or alias_to_name.get(key)
        if name is None:
            errors.add(f"{field_prefix}.{key}", "unknown parameter for this method")
            continue
        if name in resolved:
            errors.add(f"{field_prefix}.{key}", f"given twice (as {name} and an alias)")
            continue
        spec = by_name[name]
        try:
            value = coerce(spec, raw)
        except ValueError as exc:
            errors.add(f"{field_prefix}.{key}", str(exc))
            continue
        problem = check_range(spec, value)
        if problem:
            errors.add(f"{field_prefix}.{key}", problem)
            continue
        resolved[name] = value
    for spec in specs:
        if spec.name not in resolved:
            if spec.required:
                errors.add(f"{field_prefix}.{spec.name}", "is required")
            else:
                resolved[spec.name] = spec.default
    errors.raise_if_any()
    return {s.name: resolved[s.name] for s in specs}


def to_flags(params: dict[str, Any]) -> list[str]:
    """DeepExtension runner flags: --key=value, booleans as true/false."""
    return [f"--{key}={_flag_value(value)}" for key, value in params.items()]


def to_env(params: dict[str, Any]) -> dict[str, str]:
    return {env_name(key): _flag_value(value) for key, value in params.items()}


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
