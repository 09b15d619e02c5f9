"""`tuneforge train`'s per-parameter flags, generated from a method's parameter schema (GET /api/v1/methods).

Each parameter `lora_rank` is the flag `--lora-rank VALUE` (its aliases work too: `--lora-r`); a bool is
`--packing` / `--no-packing` (or `--packing=false`). Values are checked here against the schema's type, range and
choices, and a bad one is refused naming the flag; the jobs service stays the judge of the rest (e.g. rules
between parameters). Only the flags given are sent, so the method's defaults (and a copied job's values) hold.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.table import Table

TRUE = {"true", "1", "yes", "on"}
FALSE = {"false", "0", "no", "off"}


class FlagError(ValueError):
    """A bad method flag or value; `flag` is the flag as the user wrote it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag, self.message = flag, message


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class MethodFlag:
    spec: dict[str, Any]
    flag: str

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def type(self) -> str:
        return str(self.spec.get("type", "string"))

    def convert(self, raw: str, given_as: str) -> Any:
        """`raw` as the parameter's type, within its range and choices; a FlagError naming `given_as` if not."""
        kind, spec = self.type, self.spec
        if kind == "bool":
            if raw.lower() in TRUE:
                return True
            if raw.lower() in FALSE:
                return False
            raise FlagError(given_as, f"{raw!r} is not a boolean (true or false)")
        value: Any
        if kind == "int":
            try:
                value = int(raw)
            except ValueError:
                raise FlagError(given_as, f"{raw!r} is not an integer") from None
        elif kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise FlagError(given_as, f"{raw!r} is not a number") from None
            if not math.isfinite(value):
                raise FlagError(given_as, f"{raw!r} is not a finite number")
        else:
            value = raw
        choices = spec.get("choices") or []
        if choices and value not in choices:
            raise FlagError(given_as, f"{raw!r} is not one of: {', '.join(map(str, choices))}")
        low, high = spec.get("minimum"), spec.get("maximum")
        if kind in ("int", "float"):
            if low is not None and value < low:
                raise FlagError(given_as, f"{raw} is below the minimum {number(low)}")
            if high is not None and value > high:
                raise FlagError(given_as, f"{raw} is above the maximum {number(high)}")
        return value


def number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def method_flags(parameters: Iterable[dict[str, Any]], taken: Iterable[str] = ()) -> dict[str, MethodFlag]:
    """Each accepted spelling (`--lora-rank`, its aliases' flags) -> its parameter. A parameter whose flag a
    fixed `train` option already takes (a custom method's `name`, say) is spelled `--param-<name>` instead."""
    taken = set(taken)
    by_flag: dict[str, MethodFlag] = {}
    entries = []
    for spec in parameters:
        flag = flag_of(spec["name"])
        if flag in taken:
            flag = flag_of(f"param_{spec['name']}")
        entries.append(MethodFlag(spec, flag))
        by_flag[flag] = entries[-1]
    for entry in entries:  # after every name, so that a name wins over another parameter's alias
        for alias in entry.spec.get("aliases") or []:
            if flag_of(alias) not in taken:
                by_flag.setdefault(flag_of(alias), entry)
    return by_flag


def parse_method_flags(
    flags: dict[str, MethodFlag], args: list[str], method: str, other_flags: Iterable[str] = ()
) -> dict[str, Any]:
    """The parameters given in `args` (`--flag VALUE`, `--flag=VALUE`, `--bool`, `--no-bool`) by name; an unknown
    flag is refused with the closest of these and `other_flags` (the command's own) as a hint."""
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise FlagError(arg, f"unexpected argument {arg!r}")
        flag, eq, raw = arg.partition("=")
        entry = flags.get(flag)
        negated = False
        if entry is None and flag.startswith("--no-"):
            entry = flags.get("--" + flag.removeprefix("--no-"))
            negated = entry is not None and entry.type == "bool"
            if not negated:
                entry = None
        if entry is None:
            close = difflib.get_close_matches(flag, [*flags, *other_flags], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise FlagError(flag, f"no such option for method {method}{hint}; see `tuneforge methods show {method}`")
        if entry.type == "bool" and not eq:
            value: Any = not negated
        elif negated:
            raise FlagError(flag, f"{flag} takes no value")
        else:
            if not eq:
                if i >= len(args):
                    raise FlagError(flag, f"{flag} needs a value")
                raw = args[i]
                i += 1
            value = entry.convert(raw, flag)
        if entry.name in given and given[entry.name] != flag:
            raise FlagError(flag, f"{flag} and {given[entry.name]} set the same parameter {entry.name}")
        given[entry.name] = flag
        values[entry.name] = value
    return values


def shown_default(spec: dict[str, Any]) -> str:
    value = spec.get("default_value")
    if spec.get("type") == "int" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else repr(value) if value == "" else str(value)


def allowed(spec: dict[str, Any]) -> str:
    if spec.get("choices"):
        return " | ".join(map(str, spec["choices"]))
    low, high = spec.get("minimum"), spec.get("maximum")
    if low is None and high is None:
        return ""
    return f"{number(low) if low is not None else ''}..{number(high) if high is not None else ''}"


def flags_table(flags: dict[str, MethodFlag], title: str) -> Table:
    """The method's flags: one row per parameter with its type, default, range or choices and help."""
    table = Table(
        title=title, title_justify="left", caption="a bool flag is --name or --no-name", caption_justify="left"
    )
    table.add_column("flag", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("default", overflow="fold")
    table.add_column("allowed", overflow="fold", max_width=24)
    table.add_column("help", overflow="fold", min_width=30)
    seen: set[str] = set()
    for entry in flags.values():
        if entry.name in seen:
            continue
        seen.add(entry.name)
        table.add_row(
            entry.flag,
            entry.type,
            shown_default(entry.spec),
            allowed(entry.spec),
            str(entry.spec.get("help", "")),
        )
    return table
