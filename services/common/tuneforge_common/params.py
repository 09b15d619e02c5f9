"""Resolve user-supplied hyperparameters against a method's schema (pure, no I/O).

The schemas themselves live in `methods.py`, which imports this module; the two places here that
need it (the built-in parameter matrix and the per-method cross-field rules) import it when called.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import FieldViolation, ViolationCollector

TYPE_NAMES = ("int", "float", "bool", "string")
GROUPS = ("basic", "advanced")
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

# Names the runner contract already uses for its own flags (see tuneforge_trainer.agent.build_command).
RESERVED_PARAM_NAMES = ("model_path", "dataset_path", "output_dir", "resume_from_checkpoint")
# A parameter is also passed to the runner as an environment variable (env_name), so an added method's
# parameter must not be able to set one that changes what runs or where: the loader, the interpreter,
# the hub credentials, the GPUs, the agent's own TUNEFORGE_* variables. The agent drops these too.
PROTECTED_ENV_NAMES = ("PATH", "HOME", "USER", "SHELL", "TMPDIR", "PWD")
PROTECTED_ENV_PREFIXES = (
    "PYTHON",
    "LD_",
    "DYLD_",
    "HF_",
    "HUGGINGFACE_",
    "CUDA_",
    "NCCL_",
    "TORCH_",
    "TRANSFORMERS_",
    "TUNEFORGE_",
    "OMP_",
    "MKL_",
)
PARAM_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
SPEC_KEYS = ("name", "type", "default", "min", "max", "choices", "help", "group", "aliases")
MAX_HELP = 1000


def env_name(name: str) -> str:
    """The environment variable a runner also reads a parameter from: LORA_RANK for lora_rank."""
    return name.upper()


def protected_env_problem(name: str) -> str | None:
    """Why a parameter may not be passed as the environment variable `name`, or None when it may."""
    if name in PROTECTED_ENV_NAMES:
        return f"its environment variable {name} is the runner's own ({', '.join(PROTECTED_ENV_NAMES)})"
    prefix = next((p for p in PROTECTED_ENV_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        return (
            f"its environment variable {name} starts with {prefix}, which configures the interpreter, libraries, "
            f"GPUs or the platform ({', '.join(p + '*' for p in PROTECTED_ENV_PREFIXES)})"
        )
    return None


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
    # Built-in method ids that take this parameter (see methods.parameter_matrix); empty for added methods.
    applies_to: tuple[str, ...] = ()

    @property
    def env_name(self) -> str:
        return env_name(self.name)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["choices"] = list(self.choices)
        data["aliases"] = list(self.aliases)
        data["applies_to"] = list(self.applies_to)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParamSpec:
        """Inverse of to_json; JSON stored before a field existed (applies_to) gets its default."""
        return cls(
            **{
                **data,
                "choices": tuple(data.get("choices", ())),
                "aliases": tuple(data.get("aliases", ())),
                "applies_to": tuple(data.get("applies_to", ())),
            }
        )


def specs_from_dataclass(params_cls: type) -> list[ParamSpec]:
    """One ParamSpec per field; for a built-in method's class, applies_to comes from the parameter matrix."""
    from .methods import parameter_matrix_for  # methods.py imports this module; import it only when called

    matrix = parameter_matrix_for(params_cls)
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
                applies_to=tuple(matrix.get(f.name, ())),
            )
        )
    return specs


def json_kind(value: Any) -> str:
    """A value's JSON type name (never a Python one): object, array, boolean, number, string or null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return "value"


_A_KIND = {"object": "an object", "array": "an array", "boolean": "a boolean", "number": "a number", "null": "null"}


def _shown(value: Any) -> str:
    """A value as an error message shows it: a string in JSON quotes, a finite number as is, else its JSON kind."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "...", ensure_ascii=False)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    kind = json_kind(value)
    return _A_KIND.get(kind, f"a {kind}")


def parse_bool(value: Any) -> bool:
    """Explicit boolean parsing: never bool("false") == True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    raise ValueError(f"expected true or false, got {_shown(value)}")


def coerce(spec: ParamSpec, value: Any) -> Any:
    """Convert a JSON or flag value to the spec's type; ValueError says why not, in JSON's words."""
    if spec.type == "bool":
        return parse_bool(value)
    if spec.type == "int":
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected an integer, got {_shown(value)}")
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {_shown(value)}") from None
        raise ValueError(f"expected an integer, got {_shown(value)}")
    if spec.type == "float":
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        if not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number, got {_shown(value)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {_shown(value)}") from None
        except OverflowError:  # an integer beyond a double's range
            raise ValueError("expected a finite number") from None
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if isinstance(value, (Mapping, list, tuple)) or value is None:
        raise ValueError(f"expected a string, got {_shown(value)}")
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
    specs: list[ParamSpec],
    given: dict[str, Any],
    field_prefix: str = "parameters",
    *,
    method_id: str | None = None,
) -> dict[str, Any]:
    """Canonical names, coerced types, ranges checked, defaults filled; then the method's cross-field rules.

    A parameter may be given by its name, an alias or its environment name (LORA_RANK); an explicit null
    (Mistral's OptionalNullable fields send `"training_steps": null`) is the same as not giving it, so
    the default applies (and a required parameter is still required). With `method_id`,
    the rules registered for that method in `methods.CROSS_FIELD_RULES` run once every field is valid on
    its own (an unknown id has none). Raises InvalidArgument listing every bad field as `parameters.<name>`.
    """
    by_name = {s.name: s for s in specs}
    other_names = {s.env_name: s.name for s in specs if s.env_name not in by_name}
    other_names.update({alias: s.name for s in specs for alias in s.aliases})
    errors = ViolationCollector()
    resolved: dict[str, Any] = {}
    for key, raw in given.items():
        name = key if key in by_name else other_names.get(key)
        if name is None:
            errors.add(f"{field_prefix}.{key}", "unknown parameter for this method")
            continue
        if raw is None:  # null: not given
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
    ordered = {s.name: resolved[s.name] for s in specs}
    if method_id is not None:
        from .methods import check_cross_field  # methods.py imports this module; import it only when called

        errors.violations.extend(check_cross_field(method_id, ordered, field_prefix))
        errors.raise_if_any()
    return ordered


def parse_param_spec(data: Any, where: str) -> tuple[ParamSpec | None, list[FieldViolation]]:
    """A parameter spec written by a user (an added method's `parameters[i]`), checked strictly.

    Keys: name, type (int/float/bool/string), default, min, max, choices, help, group, aliases. A
    parameter without a default must be given with every job. Violations name `<where>.<key>`.
    """
    errors = ViolationCollector()
    if not isinstance(data, Mapping):
        return None, [FieldViolation(where, "must be an object with name, type and optionally default, min, max, ...")]
    for key in data:
        if key not in SPEC_KEYS:
            errors.add(f"{where}.{key}", f"unknown key; expected one of {', '.join(SPEC_KEYS)}")

    name = data.get("name")
    if not isinstance(name, str) or not name:
        errors.add(f"{where}.name", "is required")
    elif not PARAM_NAME_RE.fullmatch(name):
        errors.add(
            f"{where}.name", "must be lower snake case (a-z, 0-9, _), start with a letter, at most 64 characters"
        )
    elif name in RESERVED_PARAM_NAMES:
        errors.add(f"{where}.name", f"is set by the platform for every run ({', '.join(RESERVED_PARAM_NAMES)})")
    elif problem := protected_env_problem(env_name(name)):
        errors.add(f"{where}.name", f"can't be used: {problem}")
    kind = data.get("type")
    if kind is None:
        errors.add(f"{where}.type", f"is required: one of {', '.join(TYPE_NAMES)}")
    elif kind not in TYPE_NAMES:
        errors.add(f"{where}.type", f"must be one of {', '.join(TYPE_NAMES)}")
        kind = None
    help_text = data.get("help", "")
    if not isinstance(help_text, str) or len(help_text) > MAX_HELP:
        errors.add(f"{where}.help", f"must be text of at most {MAX_HELP} characters")
    group = data.get("group", "basic")
    if group not in GROUPS:
        errors.add(f"{where}.group", f"must be one of {', '.join(GROUPS)}")

    bounds: dict[str, float | None] = {"min": None, "max": None}
    for key in bounds:
        if data.get(key) is None:
            continue
        value = data[key]
        if kind is not None and kind not in ("int", "float"):
            errors.add(f"{where}.{key}", "only int and float parameters have bounds")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.add(f"{where}.{key}", "must be a finite number")
        else:
            bounds[key] = value
    low, high = bounds["min"], bounds["max"]
    if low is not None and high is not None and low > high:
        errors.add(f"{where}.max", f"must be >= min ({_fmt(low)})")

    choices = data.get("choices") or []
    if choices:
        if kind is not None and kind != "string":
            errors.add(f"{where}.choices", "only string parameters have choices")
        elif not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
            errors.add(f"{where}.choices", "must be a list of non-empty strings")
        elif len(set(choices)) != len(choices):
            errors.add(f"{where}.choices", "must not repeat a value")
    aliases = data.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and ALIAS_RE.fullmatch(a) for a in aliases):
        errors.add(f"{where}.aliases", "must be a list of names (letters, digits and _, starting with a letter)")
    elif name in aliases or len(set(aliases)) != len(aliases):
        errors.add(f"{where}.aliases", "must not repeat the name or an alias")

    if errors.violations or kind is None or not isinstance(name, str):
        return None, errors.violations
    spec = ParamSpec(
        name=name,
        type=kind,
        help=help_text,
        minimum=low,
        maximum=high,
        choices=tuple(choices),
        aliases=tuple(aliases),
        group=group,
        required="default" not in data or data["default"] is None,
    )
    if spec.required:
        return spec, []
    try:
        default = coerce(spec, data["default"])
    except ValueError as exc:
        return None, [FieldViolation(f"{where}.default", str(exc))]
    problem = check_range(spec, default)
    if problem:
        return None, [FieldViolation(f"{where}.default", problem)]
    return dataclasses.replace(spec, default=default), []


def to_flags(params: dict[str, Any]) -> list[str]:
    """DeepExtension runner flags: --key=value, booleans as true/false."""
    return [f"--{key}={_flag_value(value)}" for key, value in params.items()]


def to_env(params: dict[str, Any]) -> dict[str, str]:
    return {env_name(key): _flag_value(value) for key, value in params.items()}


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
