"""`tuneforge deploy`, `undeploy`, `chat` and `keys`."""

from __future__ import annotations

import sys
import time
from typing import Any

import typer

from ..client import Client
from ..support import ENDED_BADLY, EXIT_CODES_HELP, JSON_OPTION, client_of, err, listing_table, out, print_json, when

keys = typer.Typer(help="API keys: list, create, revoke.", invoke_without_command=True)
ENDED_DEPLOYMENT = ("FAILED", "STOPPED")


def deploy(
    ctx: typer.Context,
    model_id: str = typer.Argument(..., metavar="MODEL"),
    wait: bool = typer.Option(False, "--wait", help="Wait until it is LIVE (exit 1 if it fails)."),
    timeout: float = typer.Option(600.0, help="With --wait: give up after this many seconds (exit 1)."),
    max_model_len: int = typer.Option(0, help="The worker's context length; 0: the model's."),
    gpus: int = typer.Option(0, help="GPUs the worker needs."),
    json: bool = JSON_OPTION,
) -> None:
    """Start an inference worker for a model (OpenAI's /v1/chat/completions then answers for it)."""
    client = client_of(ctx)
    body: dict[str, Any] = {"parameters": {"max_model_len": max_model_len} if max_model_len else {}}
    body["resources"] = {"gpu_count": gpus}
    deployment = client.post(f"/api/v1/models/{model_id}/deploy", body)
    if not json:
        out.print(f"deployment [bold]{deployment['id']}[/bold] of {model_id}: {deployment['state']}")
    if wait:
        deadline = time.monotonic() + timeout
        with err.status(f"waiting for {deployment['id']} to be live", spinner="dots"):
            while deployment["state"] not in ("LIVE", *ENDED_DEPLOYMENT) and time.monotonic() < deadline:
                time.sleep(1.0)
                deployment = client.get(f"/api/v1/deployments/{deployment['id']}")
    if json:
        print_json(deployment)
    elif wait:
        reason = f": {deployment['state_reason']}" if deployment.get("state_reason") else ""
        out.print(f"deployment {deployment['id']} {deployment['state']}{reason}")
    if wait and deployment["state"] != "LIVE":
        raise typer.Exit(ENDED_BADLY)


def undeploy(
    ctx: typer.Context, deployment_id: str = typer.Argument(..., metavar="DEPLOYMENT"), json: bool = JSON_OPTION
) -> None:
    """Stop a deployment's worker and free its agent."""
    deployment = client_of(ctx).delete(f"/api/v1/deployments/{deployment_id}")
    if json:
        print_json(deployment)
    else:
        out.print(f"deployment {deployment['id']} {deployment['state']}")


def _logit_bias(pairs: list[str], ctx: typer.Context) -> dict[str, int]:
    bias = {}
    for pair in pairs:
        token, sep, value = pair.partition("=")
        try:
            bias[str(int(token))] = int(value)
        except ValueError:
            raise typer.BadParameter(
                f"must be TOKEN_ID=BIAS, got {pair!r}", ctx=ctx, param_hint="'--logit-bias'"
            ) from None
        if not sep:
            raise typer.BadParameter(f"must be TOKEN_ID=BIAS, got {pair!r}", ctx=ctx, param_hint="'--logit-bias'")
    return bias


def _answer(client: Client, request: dict[str, Any], json: bool) -> str:
    """One answer: streamed token by token to stdout, or with --json the chat.completion object."""
    if json:
        completion = client.request("POST", "/v1/chat/completions", json=request, timeout=900.0)
        print_json(completion)
        return str(completion["choices"][0]["message"].get("content") or "")
    text = []
    for chunk in client.chat_stream(request):
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if not "".join(text):
        err.print("(the model gave an empty answer)")
    return "".join(text)


def chat(
    ctx: typer.Context,
    model_id: str = typer.Argument(..., metavar="MODEL", help="A deployed model (`tuneforge deploy MODEL`)."),
    message: str = typer.Option("", "--message", "-m", help="Ask this once and exit; without it, a chat loop."),
    system: str = typer.Option("", help="A system prompt."),
    max_tokens: int = typer.Option(256, help="The longest answer, in tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 is greedy."),
    logit_bias: list[str] = typer.Option([], help="TOKEN_ID=BIAS (-100..100), OpenAI's logit_bias; repeat."),
    json: bool = JSON_OPTION,
) -> None:
    """Chat with a deployed model: the answer streams as it is generated."""
    client = client_of(ctx)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    settings: dict[str, Any] = {"model": model_id, "max_tokens": max_tokens, "temperature": temperature}
    if logit_bias:
        settings["logit_bias"] = _logit_bias(logit_bias, ctx)
    if message:
        _answer(client, {**settings, "messages": [*messages, {"role": "user", "content": message}]}, json)
        return
    if not json:
        err.print(f"chatting with {model_id}; an empty line or Ctrl-D ends it")
    while True:
        try:
            said = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not said.strip():
            break
        messages.append({"role": "user", "content": said})
        messages.append({"role": "assistant", "content": _answer(client, {**settings, "messages": messages}, json)})


# -- keys -------------------------------------------------------------------


@keys.callback()
def _keys(ctx: typer.Context, json: bool = JSON_OPTION) -> None:
    if ctx.invoked_subcommand is None:
        list_keys(ctx, include_revoked=False, json=json)


@keys.command("list")
def list_keys(
    ctx: typer.Context,
    include_revoked: bool = typer.Option(False, "--all", help="Revoked keys too."),
    json: bool = JSON_OPTION,
) -> None:
    """List the API keys (never their secrets)."""
    found = client_of(ctx).pages("/api/v1/keys", "keys", include_revoked=str(include_revoked).lower())
    if json:
        print_json({"keys": found})
        return
    table = listing_table("API keys", "id", "name", "kind", "roles", "created", "revoked")
    for k in found:
        roles = ", ".join(f"{r['project_id']}:{r['role']}" for r in k.get("roles", []))
        table.add_row(
            k["id"], k["name"], k.get("kind", ""), "superuser" if k.get("superuser") else roles,
            when(k.get("create_time")), when(k.get("revoke_time")),
        )  # fmt: skip
    out.print(table)


@keys.command("create")
def create_key(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Who or what holds the key."),
    kind: str = typer.Option("user", help="user (a person) or service (a program)."),
    role: list[str] = typer.Option([], help="PROJECT=ROLE (viewer, member or admin); repeat."),
    superuser: bool = typer.Option(False, "--superuser", help="Admin of every project."),
    json: bool = JSON_OPTION,
) -> None:
    """Create a key; its secret is printed this once."""
    roles = {}
    for pair in role:
        project, sep, value = pair.partition("=")
        if not sep or not project:
            raise typer.BadParameter(f"must be PROJECT=ROLE, got {pair!r}", ctx=ctx, param_hint="'--role'")
        roles[project] = value
    created = client_of(ctx).post("/api/v1/keys", {"name": name, "kind": kind, "roles": roles, "superuser": superuser})
    if json:
        print_json(created)
        return
    out.print(f"key [bold]{created['id']}[/bold] ({created['name']}); its secret, shown only now:")
    out.print(created["secret"], markup=False, soft_wrap=True)


@keys.command("revoke")
def revoke_key(ctx: typer.Context, key_id: str = typer.Argument(..., metavar="KEY"), json: bool = JSON_OPTION) -> None:
    """Revoke a key: it stops working at once."""
    revoked = client_of(ctx).delete(f"/api/v1/keys/{key_id}")
    if json:
        print_json(revoked)
    else:
        out.print(f"key {revoked['id']} revoked at {when(revoked.get('revoke_time'))}")


def register(app: typer.Typer) -> None:
    app.command("deploy", epilog=EXIT_CODES_HELP)(deploy)
    app.command("undeploy", epilog=EXIT_CODES_HELP)(undeploy)
    app.command("chat", epilog=EXIT_CODES_HELP)(chat)
    app.add_typer(keys, name="keys")
