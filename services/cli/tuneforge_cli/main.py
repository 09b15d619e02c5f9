"""`tuneforge` command line (Typer + Rich): `up` runs the embedded default; the other commands are clients of a
gateway's HTTP API (--url / TUNEFORGE_URL, --key / TUNEFORGE_API_KEY, --project / TUNEFORGE_PROJECT).

Exit codes of the client commands, which scripts can rely on:

    0  done
    1  the job, dataset or deployment ended badly (FAILED, CANCELLED, INVALID)
    2  usage error: a bad option or flag value (the flag is named)
    3  the API refused the request (4xx): its message, and the field at fault, go to stderr
    4  the gateway is unreachable, or failed (5xx)

`--json` on every client command prints the API's JSON only.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .client import DEFAULT_URL
from .commands import catalog, jobs, serving
from .embedded import EmbeddedStack
from .support import EXIT_CODES_HELP, ClientCommands, Settings

app = typer.Typer(
    cls=ClientCommands,
    help="TuneForge: fine-tune language models on your own GPU nodes.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
)
console = Console()


@app.callback()
def _root(
    ctx: typer.Context,
    url: str = typer.Option(DEFAULT_URL, envvar="TUNEFORGE_URL", help="The gateway's URL."),
    key: str = typer.Option(
        "", envvar="TUNEFORGE_API_KEY", help="API key (sent as a Bearer token).", show_default=False
    ),
    project: str = typer.Option("", envvar="TUNEFORGE_PROJECT", help="Project to act in; default: the key's."),
) -> None:
    """TuneForge command line."""
    ctx.obj = Settings(url=url, key=key, project=project)


app.add_typer(catalog.models, name="models")
app.add_typer(catalog.methods, name="methods")
app.add_typer(catalog.datasets, name="datasets")
jobs.register(app)
serving.register(app)


@app.command()
def up(
    data_dir: Path = typer.Option(
        Path(os.environ.get("TUNEFORGE_DATA_DIR", ".tuneforge")),
        help="Where SQLite files, artifacts, logs and the built-in model live.",
    ),
    port: int = typer.Option(
        int(os.environ.get("TUNEFORGE_GATEWAY_PORT", "8080")),
        help="Gateway HTTP port (another free one is used when it is taken).",
    ),
) -> None:
    """Run the embedded default: NATS, SQLite, catalog, jobs, one trainer agent and the gateway."""
    stack = EmbeddedStack(data_dir=data_dir, gateway_port=port, nats_url=os.environ.get("TUNEFORGE_NATS_URL", ""))
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Both handled explicitly: a launcher started in the background inherits an ignored SIGINT.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with console.status("starting TuneForge") as status:
            stack.start(progress=lambda msg: status.update(msg))
        table = Table(title=f"TuneForge is up ({time.monotonic() - started:.1f}s)")
        table.add_column("service")
        table.add_column("address")
        table.add_row("gateway", stack.gateway_url)
        table.add_row("gateway /metrics", f"{stack.gateway_url}/metrics")
        for name in ("catalog", "jobs"):
            table.add_row(f"{name} (gRPC)", f"127.0.0.1:{stack.ports[name]}")
        for name in ("catalog", "jobs", "trainer"):
            table.add_row(f"{name} /metrics", f"http://127.0.0.1:{stack.ports[name + '-metrics']}/metrics")
        table.add_row("nats", f"127.0.0.1:{stack.ports['nats']}" if "nats" in stack.ports else stack.nats_url)
        table.add_row("data", str(stack.data_dir))
        console.print(table)
        console.print(f"TUNEFORGE_GATEWAY_URL={stack.gateway_url}", highlight=False, soft_wrap=True)
        if stack.admin_key:
            console.print(
                "An admin API key was made for this data directory. It is shown only now; keep it "
                "(send it as 'Authorization: Bearer <key>', or as the OpenAI client's api_key):"
            )
            console.print(f"TUNEFORGE_ADMIN_KEY={stack.admin_key}", highlight=False, soft_wrap=True)
        console.print("Logs are in data/logs. Press Ctrl-C to stop.")
        while not stopping:
            exited = stack.first_exit()
            if exited:
                console.print(f"[red]{exited[0]} exited with code {exited[1]}; stopping[/red]")
                raise typer.Exit(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        console.print(f"[red]failed to start: {exc}[/red] (see {stack.data_dir}/logs)")
        raise typer.Exit(1) from None
    finally:
        console.print("stopping TuneForge ...")
        stack.stop()
        console.print("stopped.")
