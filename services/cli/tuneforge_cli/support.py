"""What every client command shares: the gateway settings, the consoles, `--json` output and the exit codes.

Exit codes (a script can rely on them):

    0  done
    1  the job, dataset or deployment ended badly (FAILED, CANCELLED, INVALID)
    2  usage error: a bad option or flag value (the flag is named)
    3  the API refused the request (4xx): its message, and the field at fault, go to stderr
    4  the gateway is unreachable, or failed (5xx)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .client import ApiError, Client, Unreachable

OK, ENDED_BADLY, USAGE, REFUSED, UNREACHABLE = 0, 1, 2, 3, 4

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 the job, dataset or deployment ended badly; 2 usage error; "
    "3 the API refused the request (4xx); 4 the gateway is unreachable or failed (5xx)."
)

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def exit_code_of(error: Exception) -> int:
    if isinstance(error, ApiError):
        return REFUSED if 400 <= error.status < 500 else UNREACHABLE
    return UNREACHABLE


def report(error: ApiError | Unreachable) -> None:
    """The error on stderr, as plain text a script can grep: the API's message and the field at fault."""
    if isinstance(error, ApiError):
        where = f" (field: {error.field})" if error.field else ""
        err.print(f"error: {error.message}{where} [{error.status} {error.code}]", markup=False)
    else:
        err.print(f"error: {error}", markup=False)


class ClientCommands(TyperGroup):
    """The root group: an API error or an unreachable gateway, anywhere below, becomes its message on stderr
    and its exit code (3 or 4) instead of a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (ApiError, Unreachable) as error:
            report(error)
            raise typer.Exit(exit_code_of(error)) from None


@dataclass
class Settings:
    url: str
    key: str
    project: str

    def client(self) -> Client:
        return Client(self.url, self.key, self.project)


def client_of(ctx: typer.Context) -> Client:
    settings = ctx.find_object(Settings)
    if settings is None:  # a command invoked without the root callback (tests calling a sub-app)
        settings = Settings("http://127.0.0.1:8080", "", "")
    client = settings.client()
    ctx.call_on_close(client.close)
    return client


def print_json(data: Any) -> None:
    """The API's JSON, alone on stdout (no colour, no wrapping), for scripts."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def print_json_line(data: Any) -> None:
    """One JSON document per line (for streams: `jobs watch --json`, `logs -f --json`)."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def when(timestamp: str | None) -> str:
    """An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    return (timestamp or "").replace("T", " ")[:19]


def duration(seconds: float | None) -> str:
    if not seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def size(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


JSON_OPTION = typer.Option(False, "--json", help="Print the API's JSON only (for scripts).")


def listing_table(title: str, *columns: str) -> Table:
    """A list command's table; its id column never wraps, since the id is what the other commands take."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, no_wrap=column == "id")
    return table


def details_table(title: str) -> Table:
    """A show command's key/value table (long values such as URIs fold rather than being cut)."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    return table
