"""`tuneforge train`, `jobs`, `logs`, `compare`, `cancel`/`pause`/`resume` and `publish`."""

from __future__ import annotations

import json as jsonlib
import sys
import time
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..client import TERMINAL_JOB_STATES, ApiError, Client, Unreachable
from ..method_flags import FlagError, flags_table, method_flags, parse_method_flags
from ..support import (
    ENDED_BADLY,
    EXIT_CODES_HELP,
    JSON_OPTION,
    client_of,
    details_table,
    duration,
    err,
    listing_table,
    out,
    print_json,
    print_json_line,
    when,
)

jobs = typer.Typer(help="Training jobs: list, show, watch.", invoke_without_command=True)

# train's own options: a method parameter of one of these names is spelled --param-<name> (method_flags).
TRAIN_FLAGS = (
    "--method",
    "--model",
    "--dataset",
    "--validation-dataset",
    "--name",
    "--dry-run",
    "--copy",
    "--watch",
    "--priority",
    "--label",
    "--gpus",
    "--json",
    "--help",
)
DEFAULT_METHOD = "sft-lora"
STATE_COLOURS = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "red", "RUNNING": "cyan", "PAUSED": "yellow"}


def coloured(state: str) -> str:
    colour = STATE_COLOURS.get(state, "white")
    return f"[{colour}]{state}[/{colour}]"


# -- train ------------------------------------------------------------------


def _estimate_table(estimate: dict[str, Any]) -> Table:
    table = Table(title="estimate", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("dataset rows", str(estimate.get("dataset_rows", 0)))
    if estimate.get("dataset_tokens"):
        table.add_row("dataset tokens", f"{int(estimate['dataset_tokens']):,}")
    table.add_row("epochs", f"{float(estimate.get('epochs', 0)):g}")
    table.add_row("total steps", str(estimate.get("total_steps", 0)))
    seconds = float(estimate.get("estimated_seconds") or 0)
    table.add_row("estimated time", duration(seconds) if seconds else "unknown (no comparable finished job yet)")
    return table


def _bad(ctx: typer.Context, flag: str, message: str) -> typer.BadParameter:
    return typer.BadParameter(message, ctx=ctx, param_hint=f"'{flag}'")


def train(
    ctx: typer.Context,
    method: str = typer.Option("", help=f"Training method (`tuneforge methods`); default {DEFAULT_METHOD}."),
    model: str = typer.Option("", help="Base model id (`tuneforge models`)."),
    dataset: str = typer.Option("", help="Training dataset id (`tuneforge datasets`)."),
    validation_dataset: str = typer.Option("", help="Evaluate on this dataset instead of a held-out share."),
    name: str = typer.Option("", help="The job's name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only validate and print the estimate; nothing is stored."),
    copy: str = typer.Option("", help="Copy this job, changing only the flags given."),
    watch: bool = typer.Option(False, "--watch", help="Then follow it to the end (as `jobs watch`)."),
    priority: int = typer.Option(0, help="Higher runs first (-1000..1000)."),
    label: list[str] = typer.Option([], help="key=value; repeat for several."),
    gpus: int = typer.Option(0, help="GPUs the job needs."),
    json: bool = JSON_OPTION,
    show_help: bool = typer.Option(False, "--help", help="Show this message and the method's parameter flags."),
) -> None:
    """Submit a training job. Each parameter of the method is a flag: `--lora-rank 8`, `--max-steps 3`,
    `--packing/--no-packing`; `tuneforge train --method M --help` lists them (read from the gateway)."""
    client = client_of(ctx)
    source: dict[str, Any] | None = client.get(f"/api/v1/jobs/{copy}") if copy else None
    if source and method and method != source["method_id"]:
        raise _bad(ctx, "--method", f"a copy keeps its job's method ({source['method_id']}); not {method}")
    method_id = method or (source["method_id"] if source else DEFAULT_METHOD)
    if show_help:
        text = ctx.get_help()  # Typer's rich help prints itself and returns ""
        if text:
            typer.echo(text)
        try:
            spec = client.get(f"/api/v1/methods/{method_id}")
        except (ApiError, Unreachable) as error:  # the help above stands; say why the method's flags are missing
            err.print(f"{method_id}'s parameter flags come from the gateway, which answered: {error}", markup=False)
            raise typer.Exit() from None
        out.print(flags_table(method_flags(spec.get("parameters", []), TRAIN_FLAGS), f"{method_id}'s parameter flags"))
        raise typer.Exit()
    parameters: dict[str, Any] = {}
    if ctx.args:
        spec = client.get(f"/api/v1/methods/{method_id}")
        try:
            flags = method_flags(spec.get("parameters", []), TRAIN_FLAGS)
            parameters = parse_method_flags(flags, ctx.args, method_id, TRAIN_FLAGS)
        except FlagError as bad:
            raise _bad(ctx, bad.flag, bad.message) from None
    labels = {}
    for pair in label:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _bad(ctx, "--label", f"must be key=value, got {pair!r}")
        labels[key] = value
    if source:
        for flag, kept in (("--priority", priority), ("--label", labels), ("--gpus", gpus)):
            if kept:
                raise _bad(ctx, flag, "a copy keeps its job's; give it without --copy")
        body: dict[str, Any] = {
            "parameter_overrides": parameters,
            "model_id": model,
            "dataset_id": dataset,
            "validation_dataset_id": validation_dataset,
            "name": name,
            "dry_run": dry_run,
        }
        answer = client.post(f"/api/v1/jobs/{copy}/copy", body)
    else:
        for flag, required in (("--model", model), ("--dataset", dataset)):
            if not required:
                raise _bad(ctx, flag, "is required (unless --copy JOB)")
        body = {
            "model_id": model,
            "dataset_id": dataset,
            "validation_dataset_id": validation_dataset,
            "method_id": method_id,
            "parameters": parameters,
            "priority": priority,
            "name": name,
            "labels": labels,
            "resources": {"gpu_count": gpus},
            "dry_run": dry_run,
        }
        answer = client.post("/api/v1/jobs", body)
    if dry_run:
        if json:
            print_json(answer)
        else:
            out.print(f"dry run of {method_id}: nothing was stored")
            out.print(_estimate_table(answer.get("estimate", {})))
        return
    if json and not watch:
        print_json(answer)
        return
    if json:  # then the events, one JSON line each
        print_json_line(answer)
    if not json:
        steps = answer.get("estimate", {}).get("total_steps") or answer.get("total_steps")
        copied = f" (a copy of {copy})" if copy else ""
        out.print(f"job [bold]{answer['id']}[/bold] {coloured(answer['state'])}{copied}: {method_id}, {steps} steps")
    if watch:
        raise typer.Exit(watch_job(client, answer["id"], json))


# -- watching a job -------------------------------------------------------------


class JobProgress:
    """The live bar's fields, from the job's events: state, step/total, loss, tokens/s and the time left."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.state = job.get("state", "")
        self.step = int(job.get("current_step") or 0)
        self.total = int(job.get("total_steps") or 0)
        self.remaining = float(job.get("remaining_seconds") or 0)
        self.loss: float | None = None
        self.tokens_per_second: float | None = None
        self.first: tuple[float, int] | None = None  # (time, step) when steps began to move here

    def take(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "job":
            self.state = data.get("state", self.state)
            self.step = max(self.step, int(data.get("current_step") or 0))
            self.total = int(data.get("total_steps") or self.total)
            self.remaining = float(data.get("remaining_seconds") or 0)
        elif kind == "event":
            self.state = data.get("to_state") or self.state
        elif kind == "metric":
            name, value = data.get("name"), data.get("value")
            if name == "loss":
                self.loss = value
            elif name in ("tokens_per_second", "train_tokens_per_second"):
                self.tokens_per_second = value
            step = int(data.get("step") or 0)
            if step > self.step:
                self.step = step
                self.remaining = 0.0  # the snapshot's estimate is older than this step
            if self.first is None:
                self.first = (time.monotonic(), self.step)

    def eta(self) -> str:
        if self.state in TERMINAL_JOB_STATES:
            return "-"
        if self.remaining > 0:
            return duration(self.remaining)
        if self.first and self.total and self.step > self.first[1]:
            rate = (self.step - self.first[1]) / max(time.monotonic() - self.first[0], 1e-6)
            return duration((self.total - self.step) / rate)
        return "-"

    def fields(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "loss": f"{self.loss:.4f}" if self.loss is not None else "-",
            "tps": f"{self.tokens_per_second:,.0f}" if self.tokens_per_second is not None else "-",
            "eta": self.eta(),
        }


def watch_job(client: Client, job_id: str, json: bool = False, show_logs: bool = False) -> int:
    """Follow a job's event stream to its end with a live bar (or its events as JSON lines); print the final state
    and return the exit code: 0 for SUCCEEDED, 1 for FAILED or CANCELLED."""
    job = client.get(f"/api/v1/jobs/{job_id}")
    tracker = JobProgress(job)
    progress = Progress(
        TextColumn("{task.fields[state]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]}  {task.fields[tps]} tok/s  ETA {task.fields[eta]}"),
        console=err,
        disable=json,
    )
    task = progress.add_task(job_id, total=tracker.total or None, completed=tracker.step, **tracker.fields())
    last = ""
    with progress:
        while True:
            for message in client.job_events(job_id, after=last):
                last = message.id or last
                data = jsonlib.loads(message.data)
                if json:
                    print_json_line({"id": message.id, "event": message.event, "data": data})
                    continue
                tracker.take(message.event, data)
                if show_logs and message.event == "log":
                    progress.console.print(data.get("text", ""), markup=False, highlight=False)
                progress.update(task, total=tracker.total or None, completed=tracker.step, **tracker.fields())
            job = client.get(f"/api/v1/jobs/{job_id}")
            if job["state"] in TERMINAL_JOB_STATES:
                break
            time.sleep(1.0)  # the stream ended with the job still going (a restarting gateway): resume after `last`
        tracker.take("job", job)
        progress.update(task, total=tracker.total or None, completed=tracker.step, **tracker.fields())
    state = job["state"]
    if not json:
        loss = f", final loss {tracker.loss:.4f}" if tracker.loss is not None else ""
        reason = f": {job['state_reason']}" if state != "SUCCEEDED" and job.get("state_reason") else ""
        out.print(
            f"job {job_id} {coloured(state)}{reason} (step {job.get('current_step', 0)}/{job.get('total_steps', 0)}"
            f"{loss}, {duration(job.get('elapsed_seconds'))})"
        )
    return 0 if state == "SUCCEEDED" else ENDED_BADLY


# -- jobs -------------------------------------------------------------------


@jobs.callback()
def _jobs(ctx: typer.Context, json: bool = JSON_OPTION) -> None:
    if ctx.invoked_subcommand is None:
        list_jobs(ctx, state=[], kind=[], json=json)


@jobs.command("list")
def list_jobs(
    ctx: typer.Context,
    state: list[str] = typer.Option([], help="Only jobs in this state (queued, running, succeeded...); repeat."),
    kind: list[str] = typer.Option([], help="train (the default), merge, evaluate, serve; repeat."),
    json: bool = JSON_OPTION,
) -> None:
    """List the jobs, newest first."""
    found = client_of(ctx).pages("/api/v1/jobs", "jobs", state=state, kind=kind)
    if json:
        print_json({"jobs": found})
        return
    table = listing_table("jobs", "id", "name", "method", "model", "state", "step", "created")
    for j in found:
        table.add_row(
            j["id"], j.get("name", ""), j.get("method_id", "") or j.get("kind", "").lower(), j.get("model_id", ""),
            coloured(j["state"]), f"{j.get('current_step', 0)}/{j.get('total_steps', 0)}", when(j.get("create_time")),
        )  # fmt: skip
    out.print(table)


@jobs.command("show")
def show_job(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="JOB"), json: bool = JSON_OPTION) -> None:
    """A job's state, progress, parameters and output."""
    job = client_of(ctx).get(f"/api/v1/jobs/{job_id}")
    if json:
        print_json(job)
        return
    table = details_table(f"job {job['id']}")
    table.add_row("state", coloured(job["state"]) + (f": {job['state_reason']}" if job.get("state_reason") else ""))
    for key in ("name", "kind", "method_id", "model_id", "dataset_id", "validation_dataset_id", "copied_from_job_id"):
        if job.get(key):
            table.add_row(key.removesuffix("_id"), str(job[key]))
    table.add_row(
        "progress", f"step {job.get('current_step', 0)}/{job.get('total_steps', 0)}, epoch {job.get('epoch', 0):g}"
    )
    table.add_row("attempt", f"{job.get('attempt', 0)}/{job.get('max_attempts', 0)}")
    table.add_row("elapsed", duration(job.get("elapsed_seconds")))
    for key in ("create_time", "start_time", "end_time"):
        if job.get(key):
            table.add_row(key.removesuffix("_time"), when(job[key]))
    if job.get("output_uri"):
        table.add_row("output", job["output_uri"])
    for key, value in sorted((job.get("parameters") or {}).items()):
        table.add_row(f"  {key}", jsonlib.dumps(value) if isinstance(value, str | bool) else str(value))
    out.print(table)


@jobs.command("watch")
def watch(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., metavar="JOB"),
    logs: bool = typer.Option(False, "--logs", help="Print the job's log lines above the bar."),
    json: bool = JSON_OPTION,
) -> None:
    """Follow a job live (step/total, loss, tokens/s, ETA) to its end: exit 0 on SUCCEEDED, 1 otherwise.
    With --json, each event as a JSON line."""
    raise typer.Exit(watch_job(client_of(ctx), job_id, json, show_logs=logs))


def logs(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., metavar="JOB"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends."),
    json: bool = JSON_OPTION,
) -> None:
    """A job's log (stdout, stderr and the agent's lines)."""
    client = client_of(ctx)
    if follow:
        client.get(f"/api/v1/jobs/{job_id}")  # a 404 before the stream
        for message in client.job_events(job_id):
            if message.event != "log":
                continue
            line = jsonlib.loads(message.data)
            if json:
                print_json_line(line)
            else:
                sys.stdout.write(line.get("text", "") + "\n")
                sys.stdout.flush()
        return
    if json:
        print_json({"lines": client.pages(f"/api/v1/jobs/{job_id}/logs", "lines", page_size=1000)})
    else:
        sys.stdout.write(client.get(f"/api/v1/jobs/{job_id}/logs", format="text"))


def compare(
    ctx: typer.Context,
    job_ids: list[str] = typer.Argument(..., metavar="JOB JOB...", help="2 to 20 jobs."),
    json: bool = JSON_OPTION,
) -> None:
    """The parameters that differ between jobs, and each metric's final value."""
    if len(job_ids) < 2:
        raise typer.BadParameter("give at least two jobs", ctx=ctx, param_hint="'JOB JOB...'")
    found = client_of(ctx).get("/api/v1/jobs/compare", job_id=job_ids)
    if json:
        print_json(found)
        return
    table = Table(title="compare", title_justify="left")
    table.add_column("")
    for job in found["jobs"]:
        table.add_column(job["id"] + (f"\n{job['name']}" if job.get("name") else ""))
    table.add_row("state", *(coloured(j["state"]) for j in found["jobs"]))
    table.add_row("method", *(j.get("method_id", "") for j in found["jobs"]))
    table.add_row("steps", *(f"{j.get('current_step', 0)}/{j.get('total_steps', 0)}" for j in found["jobs"]))
    table.add_section()
    for difference in found.get("differing_parameters", []):
        table.add_row(difference["name"], *("-" if v is None else jsonlib.dumps(v) for v in difference["values"]))
    table.add_section()
    table.add_row("[bold]final metrics[/bold]", *("" for _ in found["jobs"]))
    for metric in found.get("metrics", []):
        by_job = {s.get("job_id"): s.get("points") or [] for s in metric.get("series", [])}
        finals = []
        for job in found["jobs"]:
            points = by_job.get(job["id"]) or []
            finals.append(f"{points[-1]['value']:.4g}" if points else "-")
        table.add_row(metric["name"], *finals)
    out.print(table)


def _transition(doc: str, path: str) -> Any:
    def command(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="JOB"), json: bool = JSON_OPTION) -> None:
        job = client_of(ctx).post(f"/api/v1/jobs/{job_id}/{path}")
        if json:
            print_json(job)
        else:
            out.print(f"job {job['id']} {coloured(job['state'])}")

    command.__doc__ = doc
    return command


cancel = _transition("Cancel (terminate) a job: its process is stopped.", "cancel")
pause = _transition("Pause a running job; `resume` continues it from its latest checkpoint.", "pause")
resume = _transition("Resume a paused job.", "resume")


def publish(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., metavar="JOB"),
    name: str = typer.Option(..., help="The new model's name."),
    step: int = typer.Option(0, help="A kept checkpoint's step; default: the best one."),
    description: str = typer.Option("", help="What the model is for."),
    json: bool = JSON_OPTION,
) -> None:
    """Publish a finished job's output (or a checkpoint) as a model."""
    body = {"name": name, "step": step, "description": description}
    published = client_of(ctx).post(f"/api/v1/jobs/{job_id}/publish", body)
    if json:
        print_json(published)
    else:
        out.print(f"published model [bold]{published['model_id']}[/bold] from job {job_id}")


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
        epilog=EXIT_CODES_HELP,
    )(train)
    app.add_typer(jobs, name="jobs")
    app.command("logs", epilog=EXIT_CODES_HELP)(logs)
    app.command("compare", epilog=EXIT_CODES_HELP)(compare)
    for name, command in (("cancel", cancel), ("pause", pause), ("resume", resume)):
        app.command(name, epilog=EXIT_CODES_HELP)(command)
    app.command("publish", epilog=EXIT_CODES_HELP)(publish)
