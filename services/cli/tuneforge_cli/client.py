"""An HTTP client of the gateway's REST API (/api/v1), its job event streams (SSE) and /v1/chat/completions.

Errors come out as two exceptions the CLI maps to exit codes: `ApiError` (the API answered with an error: its
status, code, message and the field at fault) and `Unreachable` (no answer at all).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
# A resumable upload sends the file in PUTs of this size; a dropped one resends from the gateway's offset.
UPLOAD_CHUNK = 4 * 1024 * 1024
# Transient failures (a dropped connection, a restarting gateway) retried before giving up.
RETRIES = 5
# The first retry's wait; each next one doubles, up to 15 s.
RETRY_DELAY_S = 1.0
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


class ApiError(Exception):
    """The gateway answered with an error status."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def __str__(self) -> str:
        where = f" (field: {self.field})" if self.field else ""
        return f"{self.message}{where} [{self.status} {self.code}]"


class Unreachable(Exception):
    """No answer from the gateway: refused, timed out, or the connection broke."""


def backoff(failures: int) -> float:
    return float(min(RETRY_DELAY_S * 2 ** (failures - 1), 15.0))


def error_from(resp: httpx.Response) -> ApiError:
    """The API's error body (`{"error": {code, message, field}}`, or OpenAI's `{message, type, param, code}` on /v1)
    as an ApiError; a body that is neither still gives the status and its text."""
    try:
        detail = resp.json().get("error")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, dict):
        message = str(detail.get("message") or resp.reason_phrase)
        code = str(detail.get("code") or detail.get("type") or resp.status_code)
        field = detail.get("field") or detail.get("param")
        return ApiError(resp.status_code, code, message, str(field) if field else None)
    return ApiError(resp.status_code, resp.reason_phrase or "ERROR", resp.text[:500] or resp.reason_phrase)


@dataclass
class SseMessage:
    id: str
    event: str
    data: str


def parse_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Server-Sent Events from a stream's lines (comments, the gateway's keepalives, are skipped)."""
    event_id, event = "", ""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield SseMessage(event_id, event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
    if data:
        yield SseMessage(event_id, event or "message", "\n".join(data))


class Client:
    def __init__(self, url: str = DEFAULT_URL, key: str = "", project: str = "", timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": "tuneforge-cli"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if project:
            headers["X-TuneForge-Project"] = project
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise Unreachable(f"cannot reach the gateway at {self.url}: {err or type(err).__name__}") from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a successful answer (None for a 204); an ApiError for any error status."""
        resp = self._send(method, path, **kwargs)
        if resp.status_code >= 400:
            raise error_from(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v not in (None, "", [])})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def pages(self, path: str, items: str, **params: Any) -> list[Any]:
        """Every item of a paged list (next_page_token followed to the end)."""
        collected: list[Any] = []
        token = ""
        while True:
            page = self.get(path, page_token=token, **params)
            collected += page.get(items, [])
            token = page.get("next_page_token", "")
            if not token:
                return collected

    # -- job event streams ------------------------------------------------------

    def job_events(self, job_id: str, after: str = "") -> Iterator[SseMessage]:
        """The job's events (state changes, job snapshots, metric points, log lines) until its stream ends, which
        the gateway does when the job is over. A dropped stream is resumed after the last event seen
        (Last-Event-ID): no gap, no duplicate."""
        last, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            retry = False
            try:
                with self.http.stream(
                    "GET", f"/api/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(60.0, read=None)
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise error_from(resp)
                    for message in parse_sse(resp.iter_lines()):
                        failures = 0
                        if message.event == "error":  # the gateway lost its upstream: resume from the last id
                            retry = True
                            break
                        if message.id:
                            last = message.id
                        yield message
            except httpx.TransportError as err:
                retry = True
                reason = str(err) or type(err).__name__
            else:
                reason = "the gateway's watch of the job failed"
            if not retry:
                return
            failures += 1
            if failures > RETRIES:
                raise Unreachable(f"lost the event stream of {job_id} at {self.url}: {reason}")
            time.sleep(backoff(failures))

    # -- resumable dataset uploads ---------------------------------------------

    def upload_dataset(
        self,
        path: Path,
        metadata: dict[str, Any],
        *,
        resume: str = "",
        chunk_size: int = UPLOAD_CHUNK,
        started: Callable[[str, int, int], None] = lambda upload_id, size, offset: None,
        progress: Callable[[int], None] = lambda offset: None,
    ) -> dict[str, Any]:
        """Send `path` through /api/v1/uploads in chunks and complete it into a dataset (as the catalog validated
        it). `resume` continues an upload an earlier run began, from the offset the gateway holds; `started` is
        told the upload's id, size and starting offset, `progress` each new offset."""
        size = path.stat().st_size
        if resume:
            state = self.get(f"/api/v1/uploads/{resume}")
            if state.get("size") not in (None, size):
                raise ApiError(409, "FAILED_PRECONDITION", f"upload {resume} is of {state['size']} bytes, not {size}")
        else:
            state = self.post("/api/v1/uploads", {**metadata, "size": size})
        upload_id, offset = state["upload_id"], int(state["offset"])
        started(upload_id, size, offset)
        failures = 0
        with path.open("rb") as file:
            while offset < size:
                file.seek(offset)
                chunk = file.read(chunk_size)
                headers = {
                    "Content-Range": f"bytes {offset}-{offset + len(chunk) - 1}/{size}",
                    "Content-Type": "application/octet-stream",
                }
                try:
                    resp = self.http.put(f"/api/v1/uploads/{upload_id}", content=chunk, headers=headers)
                except httpx.TransportError as err:
                    failures += 1
                    if failures > RETRIES:
                        raise Unreachable(
                            f"upload {upload_id} stopped at byte {offset} ({err}); resume it with --resume {upload_id}"
                        ) from None
                    time.sleep(backoff(failures))
                    offset = int(self.get(f"/api/v1/uploads/{upload_id}")["offset"])  # what did arrive
                    progress(offset)
                    continue
                if resp.status_code == 409 and "expected_offset" in resp.text:
                    offset = int(resp.json()["error"]["expected_offset"])  # the gateway holds more (or less)
                    continue
                if resp.status_code >= 400:
                    raise error_from(resp)
                failures = 0
                offset = int(resp.json()["offset"])
                progress(offset)
        dataset: dict[str, Any] = self.post(f"/api/v1/uploads/{upload_id}/complete")
        # A large file may still be under validation when the upload's wait ends.
        while dataset.get("status") == "VALIDATING":
            time.sleep(1.0)
            dataset = self.get(f"/api/v1/datasets/{dataset['id']}")
        return dataset

    # -- chat -------------------------------------------------------------------

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The `chat.completion.chunk` objects of a streamed /v1/chat/completions answer."""
        try:
            with self.http.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=httpx.Timeout(60.0, read=900.0)
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from(resp)
                for message in parse_sse(resp.iter_lines()):
                    if message.data.strip() == "[DONE]":
                        return
                    chunk = json.loads(message.data)
                    if "error" in chunk:  # the worker failed mid-answer
                        error = chunk["error"]
                        raise ApiError(502, str(error.get("code") or error.get("type")), str(error.get("message")))
                    yield chunk
        except httpx.TransportError as err:
            raise Unreachable(f"cannot reach the gateway at {self.url}: {err or type(err).__name__}") from None
