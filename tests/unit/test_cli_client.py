"""The CLI's HTTP client over connections that break: a job's event stream resumes after the last event it saw
(Last-Event-ID), and an upload resends from the offset the gateway holds, so nothing is lost or sent twice."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tuneforge_cli import client as client_module
from tuneforge_cli.client import Client, Unreachable, parse_sse


class Flaky(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: dict[str, Any] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, body: bytes, content_type: str = "application/json", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def cut(self, body: bytes, content_type: str) -> None:
        """Promise more than is sent, then close: the client sees the connection break mid-body."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) + 1000))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:
        if self.path == "/api/v1/jobs/j/events":
            after = self.headers.get("Last-Event-ID", "")
            self.state.setdefault("event_requests", []).append(after)
            if not after:
                frames = "id: e1\nevent: event\ndata: {}\n\nid: e2\nevent: metric\ndata: {}\n\n"
                return self.cut(frames.encode(), "text/event-stream")
            return self.reply(b"id: e3\nevent: event\ndata: {}\n\n", "text/event-stream")
        if self.path == "/api/v1/jobs/gone/events":
            return self.cut(b": keepalive\n\n", "text/event-stream")
        if self.path == "/api/v1/uploads/u1":
            return self.reply(json.dumps({"upload_id": "u1", "offset": len(self.state["stored"])}).encode())
        self.reply(b'{"error": {"code": "NOT_FOUND", "message": "no"}}', status=404)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/api/v1/uploads":
            self.state["stored"] = b""
            return self.reply(b'{"upload_id": "u1", "offset": 0}', status=201)
        if self.path == "/api/v1/uploads/u1/complete":
            return self.reply(b'{"id": "ds-1", "status": "READY"}', status=201)
        self.reply(b'{"error": {"code": "NOT_FOUND", "message": "no"}}', status=404)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        start = int(re.match(r"bytes (\d+)-", self.headers["Content-Range"]).group(1))  # type: ignore[union-attr]
        self.state.setdefault("ranges", []).append(self.headers["Content-Range"])
        assert start == len(self.state["stored"])
        if not self.state.get("dropped"):
            # The first PUT: half of its bytes arrive, then the connection breaks before the answer.
            self.state["dropped"] = True
            self.state["stored"] += body[: len(body) // 2]
            self.close_connection = True
            return
        self.state["stored"] += body
        self.reply(json.dumps({"upload_id": "u1", "offset": len(self.state["stored"])}).encode())


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(client_module, "RETRY_DELAY_S", 0.01)
    Flaky.state = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_broken_event_stream_resumes_after_the_last_event_without_gap_or_duplicate(flaky):
    client = Client(flaky)
    assert [m.id for m in client.job_events("j")] == ["e1", "e2", "e3"]
    assert Flaky.state["event_requests"] == ["", "e2"]


def test_a_stream_that_keeps_breaking_gives_up_as_unreachable(flaky):
    with pytest.raises(Unreachable, match="lost the event stream of gone"):
        list(Client(flaky).job_events("gone"))


def test_an_upload_cut_mid_chunk_resends_from_the_gateways_offset(flaky, tmp_path: Path):
    data = bytes(range(256)) * 40  # 10240 bytes: three chunks of 4096
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    offsets: list[int] = []
    dataset = Client(flaky).upload_dataset(path, {"name": "rows"}, chunk_size=4096, progress=offsets.append)
    assert dataset == {"id": "ds-1", "status": "READY"}
    assert Flaky.state["stored"] == data  # the half that arrived was kept, not sent again
    assert Flaky.state["ranges"] == [
        "bytes 0-4095/10240",
        "bytes 2048-6143/10240",
        "bytes 6144-10239/10240",
    ]
    assert offsets == [2048, 6144, 10240]


def test_sse_parsing_joins_data_lines_and_skips_comments():
    lines = [": keepalive", "", "id: 7", "event: log", "data: a", "data: b", "", "data: tail"]
    assert [(m.id, m.event, m.data) for m in parse_sse(lines)] == [("7", "log", "a\nb"), ("7", "message", "tail")]
