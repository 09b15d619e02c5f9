"""`tuneforge models`, `methods` and `datasets`: the catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ..client import UPLOAD_CHUNK
from ..method_flags import flags_table, method_flags
from ..support import (
    ENDED_BADLY,
    JSON_OPTION,
    client_of,
    details_table,
    err,
    listing_table,
    out,
    print_json,
    size,
    when,
)
from .jobs import TRAIN_FLAGS

models = typer.Typer(help="Base, customized and complete models.", invoke_without_command=True)
methods = typer.Typer(help="Training methods and their parameters.", invoke_without_command=True)
datasets = typer.Typer(help="Datasets: upload (validated), list, show.", invoke_without_command=True)


# -- models -----------------------------------------------------------------


def _models_table(found: list[dict[str, Any]]) -> Table:
    table = listing_table("models", "id", "name", "kind", "architecture", "parameters", "created")
    for m in found:
        table.add_row(
            m["id"], m["name"], m.get("kind", ""), m.get("architecture", ""), f"{m.get('parameter_count', 0):,}",
            when(m.get("create_time")),
        )  # fmt: skip
    return table


@models.callback()
def _models(ctx: typer.Context, json: bool = JSON_OPTION) -> None:
    if ctx.invoked_subcommand is None:
        list_models(ctx, kind="", json=json)


@models.command("list")
def list_models(
    ctx: typer.Context,
    kind: str = typer.Option("", help="base, customized or complete"),
    json: bool = JSON_OPTION,
) -> None:
    """List the models this project sees."""
    found = client_of(ctx).pages("/api/v1/models", "models", kind=kind)
    if json:
        print_json({"models": found})
    else:
        out.print(_models_table(found))


@models.command("show")
def show_model(
    ctx: typer.Context, model_id: str = typer.Argument(..., metavar="MODEL"), json: bool = JSON_OPTION
) -> None:
    """One model's details and lineage."""
    model = client_of(ctx).get(f"/api/v1/models/{model_id}")
    if json:
        print_json(model)
        return
    table = details_table(f"model {model['id']}")
    for key in ("name", "kind", "description", "architecture", "dtype", "context_length", "source", "uri"):
        if model.get(key) not in (None, ""):
            table.add_row(key, str(model[key]))
    table.add_row("parameters", f"{model.get('parameter_count', 0):,}")
    table.add_row("size", size(model.get("size_bytes")))
    table.add_row("chat template", "yes" if model.get("has_chat_template") else "no")
    for key, value in (model.get("lineage") or {}).items():
        if value:
            table.add_row(f"lineage.{key}", str(value))
    table.add_row("created", when(model.get("create_time")))
    out.print(table)


# -- methods ----------------------------------------------------------------


@methods.callback()
def _methods(ctx: typer.Context, json: bool = JSON_OPTION) -> None:
    if ctx.invoked_subcommand is None:
        list_methods(ctx, json=json)


@methods.command("list")
def list_methods(ctx: typer.Context, json: bool = JSON_OPTION) -> None:
    """List the training methods (built-in and added)."""
    found = client_of(ctx).pages("/api/v1/methods", "methods")
    if json:
        print_json({"methods": found})
        return
    table = listing_table("training methods", "id", "name", "lifecycle", "dataset formats", "parameters")
    for m in found:
        table.add_row(
            m["id"], m.get("display_name", ""), m.get("lifecycle", ""), ", ".join(m.get("dataset_formats", [])),
            str(len(m.get("parameters", []))),
        )  # fmt: skip
    out.print(table)


@methods.command("show")
def show_method(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME"), json: bool = JSON_OPTION) -> None:
    """A method's parameter schema: each parameter as its `tuneforge train` flag, type, default and range."""
    method = client_of(ctx).get(f"/api/v1/methods/{name}")
    if json:
        print_json(method)
        return
    out.print(f"[bold]{method['id']}[/bold]: {method.get('display_name', '')}")
    if method.get("description"):
        out.print(method["description"], markup=False)
    flags = method_flags(method.get("parameters", []), TRAIN_FLAGS)
    out.print(flags_table(flags, f"parameters ({len(method.get('parameters', []))}), as `tuneforge train` flags"))


# -- datasets ---------------------------------------------------------------


@datasets.callback()
def _datasets(ctx: typer.Context, json: bool = JSON_OPTION) -> None:
    if ctx.invoked_subcommand is None:
        list_datasets(ctx, json=json, status="")


@datasets.command("list")
def list_datasets(
    ctx: typer.Context,
    status: str = typer.Option("", help="ready, invalid or validating"),
    json: bool = JSON_OPTION,
) -> None:
    """List the datasets."""
    found = client_of(ctx).pages("/api/v1/datasets", "datasets", status=status)
    if json:
        print_json({"datasets": found})
        return
    table = listing_table("datasets", "id", "name", "status", "format", "rows", "size", "created")
    for d in found:
        table.add_row(
            d["id"], d["name"], d.get("status", ""), d.get("format", ""), str(d.get("row_count", 0)),
            size(d.get("size_bytes")), when(d.get("create_time")),
        )  # fmt: skip
    out.print(table)


def print_dataset(dataset: dict[str, Any]) -> None:
    """A dataset's summary, then its validation report: each problem by line."""
    status = dataset.get("status", "")
    colour = {"READY": "green", "INVALID": "red"}.get(status, "yellow")
    out.print(f"dataset [bold]{dataset['id']}[/bold] ({dataset.get('name', '')}): [{colour}]{status}[/{colour}]")
    out.print(
        f"  format {dataset.get('format') or '-'}, {dataset.get('row_count', 0)} rows, "
        f"{size(dataset.get('size_bytes'))}, columns: {', '.join(dataset.get('columns', [])) or '-'}"
    )
    validation = dataset.get("validation") or {}
    problems = validation.get("problems") or []
    if not problems:
        return
    total = int(validation.get("problem_count") or len(problems))
    shown = f" (the first {len(problems)} shown)" if total > len(problems) else ""
    table = Table(title=f"validation: {total} problem{'s' if total != 1 else ''}{shown}", title_justify="left")
    table.add_column("line", justify="right")
    table.add_column("field")
    table.add_column("problem", overflow="fold")
    for problem in problems:
        line = int(problem.get("line") or 0)
        table.add_row(str(line) if line else "file", problem.get("field", ""), problem.get("message", ""))
    out.print(table)


@datasets.command("show")
def show_dataset(
    ctx: typer.Context, dataset_id: str = typer.Argument(..., metavar="DATASET"), json: bool = JSON_OPTION
) -> None:
    """A dataset's details and validation report (exit 1 when it is INVALID)."""
    dataset = client_of(ctx).get(f"/api/v1/datasets/{dataset_id}")
    if json:
        print_json(dataset)
    else:
        print_dataset(dataset)
    if dataset.get("status") == "INVALID":
        raise typer.Exit(ENDED_BADLY)


@datasets.command("upload")
def upload_dataset(
    ctx: typer.Context,
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="A JSONL file."),
    name: str = typer.Option("", help="The dataset's name; default: the file's name."),
    description: str = typer.Option("", help="What is in it."),
    format: str = typer.Option(
        "", "--format", help="chat, prompt_completion, instruction, columns, text, preference, ...; default: detected."
    ),
    prompt_input_column: str = typer.Option("", help="The prompt column (columns format)."),
    prompt_output_column: str = typer.Option("", help="The answer column (columns format)."),
    resume: str = typer.Option("", help="Continue the upload an earlier run began (its upload id)."),
    chunk_size: int = typer.Option(UPLOAD_CHUNK, min=1024, help="Bytes per request; a failed one is resent."),
    json: bool = JSON_OPTION,
) -> None:
    """Upload a dataset in resumable chunks with a progress bar, then print its validation report.

    Exit 1 when the dataset is INVALID; an interrupted upload continues with --resume UPLOAD_ID.
    """
    metadata = {
        "name": name or file.name,
        "description": description,
        "format": format,
        "prompt_input_column": prompt_input_column,
        "prompt_output_column": prompt_output_column,
    }
    progress = Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
    )
    task = progress.add_task(file.name, total=file.stat().st_size)

    def started(upload_id: str, total: int, offset: int) -> None:
        if not json:
            err.print(f"upload {upload_id} ({'resumed at byte ' + str(offset) if offset else 'new'})", markup=False)
        progress.update(task, total=total, completed=offset)

    with progress:
        dataset = client_of(ctx).upload_dataset(
            file,
            metadata,
            resume=resume,
            chunk_size=chunk_size,
            started=started,
            progress=lambda offset: progress.update(task, completed=offset),
        )
    if json:
        print_json(dataset)
    else:
        print_dataset(dataset)
    if dataset.get("status") == "INVALID":
        raise typer.Exit(ENDED_BADLY)
