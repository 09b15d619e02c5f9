"""Resumable dataset uploads, spooled on the gateway's disk between requests.

The protocol (the HTTP routes are in app.py):

    POST   /api/v1/uploads                {name, description, format, prompt_*_column, size?}
                                          -> 201 {upload_id, offset: 0, ...}, Location
    PUT    /api/v1/uploads/{id}           Content-Range: bytes START-END/TOTAL (or /*), body = those bytes
                                          -> 200 {offset, ...}; 409 {expected_offset} unless START == offset
    HEAD   /api/v1/uploads/{id}           -> Upload-Offset (and Upload-Length once known) headers
    GET    /api/v1/uploads/{id}           -> the upload's state as JSON
    POST   /api/v1/uploads/{id}/complete  streams the spool to the catalog's UploadDataset -> 201 dataset
    DELETE /api/v1/uploads/{id}           -> 204

Each upload is two files in the spool directory: `<id>.part` (the bytes so far) and `<id>.json` (its metadata and
offset, replaced atomically after every chunk), so a restarted gateway carries on where the last one stopped.
The offset always counts bytes that reached the data file: a chunk cut short by a dropped connection keeps what
arrived, and the client asks for the offset (HEAD) and sends the rest. One request at a time per upload, enforced
with an advisory file lock, so two gateway processes sharing the directory do not interleave either.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .credentials import caller_fingerprint
from .errors import ApiError

UPLOAD_CHUNK = 1024 * 1024
_ID = re.compile(r"[0-9a-f]{32}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass
class Upload:
    upload_id: str
    name: str
    description: str
    format: str
    prompt_input_column: str
    prompt_output_column: str
    # Total bytes, once the client has said (at creation or in a Content-Range); None until then.
    size: int | None
    offset: int
    created_at: float
    updated_at: float
    # Fingerprint of the creator's key and project: another caller's upload is NOT_FOUND to them.
    owner: str = ""

    @property
    def complete(self) -> bool:
        return self.size is not None and self.offset == self.size

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "owner"}, "complete": self.complete}

    def headers(self) -> dict[str, str]:
        headers = {"Upload-Offset": str(self.offset), "Cache-Control": "no-store"}
        if self.size is not None:
            headers["Upload-Length"] = str(self.size)
        return headers


def parse_content_range(header: str | None) -> tuple[int, int, int | None]:
    """`bytes START-END/TOTAL` (END inclusive, TOTAL may be `*`) as (start, end, total or None)."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if not match:
        raise ApiError(
            400, "INVALID_ARGUMENT", "send Content-Range: bytes START-END/TOTAL (or /*)", field="Content-Range"
        )
    start, end, total = int(match[1]), int(match[2]), None if match[3] == "*" else int(match[3])
    if end < start or (total is not None and end >= total):
        raise ApiError(400, "INVALID_ARGUMENT", "need START <= END < TOTAL", field="Content-Range")
    return start, end, total


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


def _truncate_and_sync(fd: int, length: int) -> None:
    os.ftruncate(fd, length)
    os.fsync(fd)


class UploadSpool:
    def __init__(self, root: Path, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.ttl_s, self.clock = max_bytes, ttl_s, clock

    # -- state on disk --------------------------------------------------------

    def _paths(self, upload_id: str) -> tuple[Path, Path]:
        if not _ID.fullmatch(upload_id):
            raise self._not_found(upload_id)
        return self.root / f"{upload_id}.json", self.root / f"{upload_id}.part"

    @staticmethod
    def _not_found(upload_id: str) -> ApiError:
        return ApiError(404, "NOT_FOUND", f"no upload {upload_id!r} (completed, deleted or expired)")

    def _save(self, upload: Upload) -> None:
        sidecar, _ = self._paths(upload.upload_id)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(asdict(upload)))
        os.replace(tmp, sidecar)

    def check_size(self, size: int | None) -> None:
        if size is not None and size > self.max_bytes:
            raise ApiError(
                413, "RESOURCE_EXHAUSTED", f"a dataset upload is limited to {self.max_bytes} bytes", field="size"
            )

    def create(
        self,
        name: str,
        description: str,
        format: str,
        prompt_input_column: str,
        prompt_output_column: str,
        size: int | None,
    ) -> Upload:
        self.check_size(size)
        self.sweep()
        now = self.clock()
        upload = Upload(
            uuid.uuid4().hex,
            name,
            description,
            format,
            prompt_input_column,
            prompt_output_column,
            size,
            0,
            now,
            now,
            caller_fingerprint(),
        )
        self._paths(upload.upload_id)[1].touch()
        self._save(upload)
        return upload

    def get(self, upload_id: str) -> Upload:
        sidecar, data = self._paths(upload_id)
        try:
            upload = Upload(**json.loads(sidecar.read_text()))
            on_disk = data.stat().st_size
        except (FileNotFoundError, ValueError, TypeError):
            raise self._not_found(upload_id) from None
        if upload.owner != caller_fingerprint():
            raise self._not_found(upload_id)
        # After a crash the sidecar may claim bytes the data file never kept: the file is the truth then.
        upload.offset = min(upload.offset, on_disk)
        return upload

    def remove(self, upload_id: str) -> None:
        for path in self._paths(upload_id):
            path.unlink(missing_ok=True)

    def sweep(self) -> None:
        """Drop uploads untouched for longer than the TTL (abandoned by their clients)."""
        cutoff = self.clock() - self.ttl_s
        for data in self.root.glob("*.part"):
            with contextlib.suppress(FileNotFoundError, ApiError):
                if data.stat().st_mtime < cutoff:
                    with self._locked(data.stem):
                        self.remove(data.stem)

    @contextlib.contextmanager
    def _locked(self, upload_id: str) -> Iterator[int]:
        """The data file, opened and locked for this request; 409 while another request holds it."""
        _, data = self._paths(upload_id)
        try:
            fd = os.open(data, os.O_RDWR)
        except FileNotFoundError:
            raise self._not_found(upload_id) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ApiError(
                    409, "ABORTED", "another request for this upload is in progress; retry when it has finished"
                ) from None
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _offset_conflict(upload: Upload, message: str) -> ApiError:
        return ApiError(
            409,
            "FAILED_PRECONDITION",
            message,
            field="Content-Range",
            details={"expected_offset": upload.offset},
            headers=upload.headers(),
        )

    # -- the protocol's steps -------------------------------------------------

    async def append(self, upload_id: str, content_range: str | None, body: AsyncIterator[bytes]) -> Upload:
        """Write one chunk at the offset received so far; the offset then counts what arrived, even if cut short."""
        start, end, total = parse_content_range(content_range)
        with self._locked(upload_id) as fd:
            upload = self.get(upload_id)
            if total is not None and upload.size is not None and total != upload.size:
                raise ApiError(
                    400,
                    "INVALID_ARGUMENT",
                    f"the upload's total size is {upload.size}, not {total}",
                    field="Content-Range",
                )
            self.check_size(total)
            self.check_size(end + 1)
            if upload.size is not None and end >= upload.size:
                raise ApiError(
                    400, "INVALID_ARGUMENT", f"END is past the upload's size of {upload.size}", field="Content-Range"
                )
            if start != upload.offset:
                raise self._offset_conflict(
                    upload, f"this upload has {upload.offset} bytes; send the chunk that starts there"
                )
            declared = upload.size
            if upload.size is None:
                upload.size = total
            expected, received, pending = end - start + 1, 0, bytearray()
            try:
                async for piece in body:
                    if received + len(pending) + len(piece) > expected:
                        raise ApiError(
                            400,
                            "INVALID_ARGUMENT",
                            f"the body is longer than the {expected} bytes Content-Range names",
                            field="Content-Range",
                        )
                    pending += piece
                    if len(pending) >= UPLOAD_CHUNK:
                        await anyio.to_thread.run_sync(_pwrite_all, fd, bytes(pending), start + received)
                        received += len(pending)
                        pending.clear()
                if pending:
                    await anyio.to_thread.run_sync(_pwrite_all, fd, bytes(pending), start + received)
                    received += len(pending)
            finally:
                # Record what arrived even when the request is being cancelled (the client went away).
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_truncate_and_sync, fd, start + received)
                if received:
                    upload.offset, upload.updated_at = start + received, self.clock()
                    self._save(upload)
                else:  # nothing kept: a refused chunk does not fix the upload's total size either
                    upload.size = declared
            if received != expected:
                raise ApiError(
                    400,
                    "INVALID_ARGUMENT",
                    f"the body had {received} of the {expected} bytes Content-Range names; "
                    f"the upload is now at offset {upload.offset}",
                    field="Content-Range",
                    details={"expected_offset": upload.offset},
                    headers=upload.headers(),
                )
            return upload

    @contextlib.asynccontextmanager
    async def completing(self, upload_id: str) -> AsyncIterator[tuple[Upload, AsyncIterator[bytes]]]:
        """The upload and its bytes in chunks, locked; the spool is deleted when the block succeeds, kept (for a
        retry or a DELETE) when it raises."""
        with self._locked(upload_id) as fd:
            upload = self.get(upload_id)
            if upload.size is not None and upload.offset != upload.size:
                raise self._offset_conflict(
                    upload, f"this upload has {upload.offset} of its {upload.size} bytes; send the rest first"
                )

            async def chunks() -> AsyncIterator[bytes]:
                position = 0
                while position < upload.offset:
                    size = min(UPLOAD_CHUNK, upload.offset - position)
                    chunk = await anyio.to_thread.run_sync(os.pread, fd, size, position)
                    if not chunk:
                        return
                    position += len(chunk)
                    yield chunk

            yield upload, chunks()
            self.remove(upload_id)

    def delete(self, upload_id: str) -> None:
        with self._locked(upload_id):
            self.get(upload_id)  # only its creator's, and a 404 for an unknown one
            self.remove(upload_id)
