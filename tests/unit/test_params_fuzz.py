"""Property-based tests of parameter resolution: whatever JSON a caller sends for a built-in method's parameters,
resolve_parameters answers with values inside the method's schema or with InvalidArgument naming the fields at
fault, never with another exception (which a service would turn into INTERNAL)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge_common.errors import InvalidArgument
from tuneforge_common.methods import BUILTIN_METHODS
from tuneforge_common.params import ParamSpec, resolve_parameters, specs_from_dataclass

SPECS = {method.id: specs_from_dataclass(method.params) for method in BUILTIN_METHODS}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, as a protobuf Struct or a JSON body carries it (integers beyond a double's range included).
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["true", "false", "yes", "0", "1", " 7 ", "1e400", "nan", "-inf", "1_000", "", "auto"])
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)


def near(spec: ParamSpec) -> st.SearchStrategy[Any]:
    """Values at and around the spec's bounds and choices, where the off-by-one mistakes live."""
    bounds = [b for b in (spec.minimum, spec.maximum, spec.default) if isinstance(b, int | float)]
    around = [x + d for x in bounds for d in (-1, -0.5, 0, 0.5, 1)]
    numbers = st.sampled_from(around) if around else st.integers(-3, 3)
    return numbers | numbers.map(int) | numbers.map(str) | st.sampled_from([*spec.choices, "none"])


def values_for(spec: ParamSpec) -> st.SearchStrategy[Any]:
    return JSON | near(spec)


def names_of(spec: ParamSpec) -> list[str]:
    """Every key that names the parameter: its name, its environment name and its aliases."""
    return [spec.name, spec.env_name, *spec.aliases]


def assert_within_schema(specs: list[ParamSpec], resolved: dict[str, Any]) -> None:
    assert list(resolved) == [s.name for s in specs]
    for spec in specs:
        value = resolved[spec.name]
        if value is None:  # a parameter without a default that was not given
            assert spec.default is None and not spec.required, spec.name
            continue
        if spec.type == "bool":
            assert isinstance(value, bool), (spec.name, value)
        elif spec.type == "int":
            assert isinstance(value, int) and not isinstance(value, bool), (spec.name, value)
        elif spec.type == "float":
            assert isinstance(value, float) and math.isfinite(value), (spec.name, value)
        else:
            assert isinstance(value, str), (spec.name, value)
        if spec.choices:
            assert value in spec.choices, (spec.name, value)
        if spec.type in ("int", "float") and spec.minimum is not None:
            assert value >= spec.minimum, (spec.name, value)
        if spec.type in ("int", "float") and spec.maximum is not None:
            assert value <= spec.maximum, (spec.name, value)


@st.composite
def one_parameter(draw: st.DrawFn) -> tuple[str, list[ParamSpec], str, Any]:
    method_id = draw(st.sampled_from(sorted(SPECS)))
    spec = draw(st.sampled_from(SPECS[method_id]))
    return method_id, SPECS[method_id], draw(st.sampled_from(names_of(spec))), draw(values_for(spec))


@FUZZ
@given(one_parameter())
def test_any_json_value_for_any_parameter_resolves_within_the_schema_or_names_the_field(case):
    method_id, specs, key, value = case
    try:
        alone = resolve_parameters(specs, {key: value})
    except InvalidArgument as exc:
        # Wrong on its own: the error names the key the caller used, and nothing else.
        assert [v.field for v in exc.violations] == [f"parameters.{key}"], exc.violations
        return
    assert_within_schema(specs, alone)
    try:
        resolved = resolve_parameters(specs, {key: value}, method_id=method_id)
    except InvalidArgument as exc:
        # Valid alone, refused by a rule across fields of this method: each violation names a parameter.
        assert exc.violations and all(v.field.startswith("parameters.") for v in exc.violations), exc.violations
        return
    assert resolved == alone


@st.composite
def many_parameters(draw: st.DrawFn) -> tuple[str, list[ParamSpec], dict[str, Any]]:
    method_id = draw(st.sampled_from(sorted(SPECS)))
    specs = SPECS[method_id]
    chosen = draw(st.lists(st.sampled_from(specs), max_size=6, unique_by=lambda s: s.name))
    given_ = {draw(st.sampled_from(names_of(spec))): draw(values_for(spec)) for spec in chosen}
    unknown = draw(st.dictionaries(st.text(max_size=8), JSON, max_size=2))
    known = {name for spec in specs for name in names_of(spec)}
    return method_id, specs, given_ | {k: v for k, v in unknown.items() if k not in known}


@FUZZ
@given(many_parameters())
def test_any_json_object_of_parameters_resolves_within_the_schema_or_names_only_given_or_related_fields(case):
    method_id, specs, parameters = case
    try:
        resolved = resolve_parameters(specs, parameters, method_id=method_id)
    except InvalidArgument as exc:
        fields = [v.field for v in exc.violations]
        assert fields and all(f.startswith("parameters.") for f in fields), fields
        # A key that is no parameter of the method is always named.
        known = {name for spec in specs for name in names_of(spec)}
        assert {f"parameters.{k}" for k in parameters if k not in known} <= set(fields)
        return
    assert_within_schema(specs, resolved)
    assert all(k in {n for s in specs for n in names_of(s)} for k in parameters)
