"""The CLI's client commands against a small HTTP server that answers as the gateway does (its JSON bodies, error
bodies and SSE framing), so the flag generation, the request bodies and the exit codes are checked without a
stack: the end-to-end run against the real one is tests/e2e/test_cli.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneforge_cli.main import app

SCHEMA = [
    {"name": "max_steps", "type": "int", "help": "Total optimizer steps.", "default_value": -1.0, "minimum": -1.0,
     "maximum": 1e7, "aliases": ["training_steps"]},
    {"name": "packing", "type": "bool", "help": "Pack samples.", "default_value": True},
]  # fmt: skip


def job(job_id: str, state: str) -> dict[str, Any]:
    return {"id": job_id, "state": state, "method_id": "m", "current_step": 3, "total_steps": 3, "state_reason": ""}


def sse(*events: tuple[str, str, dict]) -> bytes:
    return b"".join(f"id: {i}\nevent: {kind}\ndata: {json.dumps(d)}\n\n".encode() for i, kind, d in events) + b": x\n\n"


class Gateway(BaseHTTPRequestHandler):
    received: list[tuple[str, str, Any, dict[str, str]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def answer(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, code: str, message: str, field: str | None = None) -> None:
        self.answer(status, {"error": {"code": code, "message": message, "field": field}})

    def handle_any(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.received.append((method, self.path, body, dict(self.headers)))
        if self.headers.get("Authorization") != "Bearer good":
            return self.error(401, "UNAUTHENTICATED", "invalid API key")
        route = (method, self.path.split("?")[0])
        if route == ("GET", "/api/v1/methods/m"):
            return self.answer(200, {"id": "m", "parameters": SCHEMA})
        if route == ("POST", "/api/v1/jobs/job-ok/copy"):
            return self.answer(201, {**job("job-copy", "QUEUED"), "estimate": {"total_steps": 3}})
        if route == ("POST", "/api/v1/jobs"):
            return self.answer(201, {**job("job-new", "QUEUED"), "estimate": {"total_steps": 3}})
        if route == ("GET", "/api/v1/jobs/job-ok"):
            return self.answer(200, job("job-ok", "SUCCEEDED"))
        if route == ("GET", "/api/v1/jobs/job-failed"):
            return self.answer(200, {**job("job-failed", "FAILED"), "state_reason": "out of memory"})
        if route == ("GET", "/api/v1/jobs/job-ok/events"):
            return self.answer(
                200,
                sse(
                    ("e1", "event", {"to_state": "RUNNING"}),
                    ("e1.m1", "metric", {"name": "loss", "step": 3, "value": 1.5}),
                    ("e2", "event", {"to_state": "SUCCEEDED"}),
                ),
                "text/event-stream",
            )
        if route == ("GET", "/api/v1/jobs/job-failed/events"):
            return self.answer(200, sse(("e1", "event", {"to_state": "FAILED"})), "text/event-stream")
        if route == ("POST", "/api/v1/keys"):
            return self.error(400, "INVALID_ARGUMENT", "name: must not be blank", "name")
        if route == ("GET", "/api/v1/models"):
            return self.error(503, "UNAVAILABLE", "a backend service is unavailable")
        return self.error(404, "NOT_FOUND", f"no route {method} {self.path}")

    def do_GET(self) -> None:
        self.handle_any("GET")

    def do_POST(self) -> None:
        self.handle_any("POST")


@pytest.fixture
def gateway() -> Iterator[str]:
    Gateway.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run(url: str, *args: str, key: str = "good") -> Any:
    env = {"TUNEFORGE_URL": url, "TUNEFORGE_API_KEY": key, "TUNEFORGE_PROJECT": "research", "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def test_train_sends_only_the_method_flags_given_converted_to_their_types(gateway):
    result = run(gateway, "train", "--method", "m", "--model", "tiny", "--dataset", "ds", "--training-steps", "3",
                 "--no-packing", "--label", "team=nlp", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "job-new"
    [submitted] = [body for method, path, body, _ in Gateway.received if (method, path) == ("POST", "/api/v1/jobs")]
    assert submitted["parameters"] == {"max_steps": 3, "packing": False}
    assert (submitted["method_id"], submitted["model_id"], submitted["dataset_id"]) == ("m", "tiny", "ds")
    assert submitted["labels"] == {"team": "nlp"} and submitted["dry_run"] is False
    headers = Gateway.received[-1][3]
    assert headers["Authorization"] == "Bearer good" and headers["X-TuneForge-Project"] == "research"


def test_a_bad_flag_value_is_a_usage_error_naming_the_flag_and_nothing_is_submitted(gateway):
    result = run(gateway, "train", "--method", "m", "--model", "tiny", "--dataset", "ds", "--max-steps", "-5")
    assert result.exit_code == 2
    assert "--max-steps" in result.output and "below the minimum -1" in result.output
    assert ("POST", "/api/v1/jobs") not in [(m, p) for m, p, _, _ in Gateway.received]
    missing = run(gateway, "train", "--method", "m", "--dataset", "ds")
    assert missing.exit_code == 2 and "--model" in missing.output


def test_train_help_lists_the_methods_flags_read_from_the_gateway(gateway):
    result = run(gateway, "train", "--method", "m", "--help")
    assert result.exit_code == 0, result.output
    assert "--max-steps" in result.output and "Total optimizer steps." in result.output
    assert "--packing" in result.output and "--dry-run" in result.output


def test_the_api_refusing_exits_3_with_its_message_and_field_on_stderr(gateway):
    refused = run(gateway, "keys", "create", " ")
    assert refused.exit_code == 3
    assert "name: must not be blank (field: name) [400 INVALID_ARGUMENT]" in refused.stderr
    assert refused.stdout == ""
    wrong_key = run(gateway, "jobs", "show", "job-ok", key="bad")
    assert wrong_key.exit_code == 3 and "invalid API key" in wrong_key.stderr
    unknown = run(gateway, "jobs", "show", "nope", "--json")
    assert unknown.exit_code == 3 and "NOT_FOUND" in unknown.stderr and unknown.stdout == ""


def test_a_5xx_exits_4_and_an_unreachable_gateway_exits_4(gateway):
    failed = run(gateway, "models", "list")
    assert failed.exit_code == 4 and "a backend service is unavailable" in failed.stderr
    unreachable = run("http://127.0.0.1:1", "jobs", "list")
    assert unreachable.exit_code == 4 and "cannot reach the gateway at http://127.0.0.1:1" in unreachable.stderr


def test_watch_exits_0_for_a_succeeded_job_and_1_for_a_failed_one(gateway):
    succeeded = run(gateway, "jobs", "watch", "job-ok")
    assert succeeded.exit_code == 0, succeeded.output
    assert "job job-ok SUCCEEDED" in succeeded.stdout and "final loss 1.5000" in succeeded.stdout
    failed = run(gateway, "jobs", "watch", "job-failed")
    assert failed.exit_code == 1 and "job job-failed FAILED: out of memory" in failed.stdout
    lines = run(gateway, "jobs", "watch", "job-ok", "--json")
    events = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [e["event"] for e in events] == ["event", "metric", "event"] and events[1]["data"]["value"] == 1.5


def test_copy_sends_only_the_overrides_given_and_keeps_the_jobs_method(gateway):
    result = run(gateway, "train", "--copy", "job-ok", "--max-steps", "5", "--name", "again")
    assert result.exit_code == 0, result.output
    assert "job job-copy QUEUED (a copy of job-ok)" in result.stdout
    [copied] = [body for method, path, body, _ in Gateway.received if path == "/api/v1/jobs/job-ok/copy"]
    assert copied["parameter_overrides"] == {"max_steps": 5} and copied["name"] == "again"
    assert copied["model_id"] == "" and copied["dataset_id"] == ""  # the old job's
    other = run(gateway, "train", "--copy", "job-ok", "--method", "dpo")
    assert other.exit_code == 2 and "--method" in other.output and "keeps its job's method (m)" in other.output
