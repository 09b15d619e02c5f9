"""Gateway memory during a large dataset upload: peak RSS growth of the gateway process against the file size.

The gateway runs as its own process (`python -m tuneforge_gateway`) in front of a fake CatalogService in this
process that hashes and discards the chunks it receives; a JSONL file is written to a temporary directory (and
deleted afterwards) and uploaded through the multipart route and through the resumable routes, each streamed
by httpx from disk. A thread samples the gateway's RSS with psutil. The baseline is the file itself: a gateway
that held the upload in memory would grow by at least the file size (ratio >= 1); a streaming one stays near 0.

    python bench/bench_upload_memory.py [--mb 200] [--put-mb 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge_common.grpcutil import ServiceBinding, start_server

MiB = 1024 * 1024


class HashingCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    """Consumes an UploadDataset stream, keeping only a running hash and a count."""

    async def UploadDataset(self, request_iterator: Any, context: Any) -> cpb.UploadDatasetResponse:
        digest, size, chunks, name = hashlib.sha256(), 0, 0, ""
        async for message in request_iterator:
            if message.WhichOneof("payload") == "metadata":
                name = message.metadata.name
                continue
            digest.update(message.chunk)
            size, chunks = size + len(message.chunk), chunks + 1
        return cpb.UploadDatasetResponse(
            dataset=compb.Dataset(
                id=f"ds-{chunks}",
                name=name,
                size_bytes=size,
                sha256=digest.hexdigest(),
                status=compb.DATASET_STATUS_READY,
            )
        )


class PeakRss:
    """Samples a process's resident set size in a thread; `peak` is the largest seen since `reset`."""

    def __init__(self, pid: int, interval_s: float = 0.002) -> None:
        self.process, self.interval_s = psutil.Process(pid), interval_s
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_jsonl(path: Path, size: int) -> str:
    """About `size` bytes of chat rows (whole lines), written in blocks; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    block = b"".join(
        b'{"messages": [{"role": "user", "content": "Question %06d: what does a LoRA adapter change?"}, '
        b'{"role": "assistant", "content": "Only two small low-rank matrices per layer."}]}\n' % i
        for i in range(4000)
    )
    with path.open("wb") as f:
        written = 0
        while written < size:
            left = size - written
            piece = block if left >= len(block) else block[: block.rfind(b"\n", 0, left) + 1]
            if not piece:
                break
            f.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


def file_pieces(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        while length > 0:
            piece = f.read(min(MiB, length))
            if not piece:
                return
            length -= len(piece)
            yield piece


def upload_multipart(client: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:  # httpx streams a file object in small pieces, with a Content-Length
        resp = client.post(
            "/api/v1/datasets", files={"file": (path.name, f, "application/x-ndjson")}, data={"name": "bench"}
        )
    resp.raise_for_status()
    return resp.json()


def upload_resumable(client: httpx.Client, path: Path, put_bytes: int) -> dict:
    size = path.stat().st_size
    upload_id = client.post("/api/v1/uploads", json={"name": "bench", "size": size}).json()["upload_id"]
    for start in range(0, size, put_bytes):
        length = min(put_bytes, size - start)
        client.put(
            f"/api/v1/uploads/{upload_id}",
            content=file_pieces(path, start, length),
            headers={"Content-Range": f"bytes {start}-{start + length - 1}/{size}", "Content-Length": str(length)},
        ).raise_for_status()
    resp = client.post(f"/api/v1/uploads/{upload_id}/complete")
    resp.raise_for_status()
    return resp.json()


def start_gateway(catalog_address: str, spool: Path) -> tuple[subprocess.Popen[str], int]:
    env = os.environ | {
        "TUNEFORGE_CATALOG_ADDRESS": catalog_address,
        "TUNEFORGE_JOBS_ADDRESS": catalog_address,
        "TUNEFORGE_GATEWAY_PORT": "0",
        "TUNEFORGE_GATEWAY_UPLOAD_DIR": str(spool),
        "TUNEFORGE_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge_gateway"], env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("TUNEFORGE_READY gateway http="):
            port = int(line.rsplit("=", 1)[1])
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, port
    raise RuntimeError(f"gateway exited with {proc.wait()} before it was ready")


async def run(mb: int, put_mb: int) -> None:
    server, port = await start_server(
        [ServiceBinding(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, HashingCatalog(), "bench")],
        "127.0.0.1",
        0,
    )
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-") as tmp:
        path = Path(tmp) / "big.jsonl"
        sha256 = write_jsonl(path, mb * 1000 * 1000)
        size = path.stat().st_size
        proc, http_port = await asyncio.to_thread(start_gateway, f"127.0.0.1:{port}", Path(tmp) / "spool")
        sampler = PeakRss(proc.pid)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as client:
                # Warm-up: the first small upload of each kind loads the code paths the large one takes.
                small = Path(tmp) / "small.jsonl"
                write_jsonl(small, 100_000)
                await asyncio.to_thread(upload_multipart, client, small)
                await asyncio.to_thread(upload_resumable, client, small, put_mb * MiB)
                small.unlink()

                paths: list[tuple[str, Callable[[], dict]]] = [
                    ("multipart POST /api/v1/datasets", lambda: upload_multipart(client, path)),
                    (
                        f"resumable PUT x{-(-size // (put_mb * MiB))} + complete",
                        lambda: upload_resumable(client, path, put_mb * MiB),
                    ),
                ]
                rows = []
                for label, upload in paths:
                    before = sampler.reset()
                    started = time.perf_counter()
                    dataset = await asyncio.to_thread(upload)
                    seconds = time.perf_counter() - started
                    peak, after = sampler.peak, sampler.now()
                    assert dataset["sha256"] == sha256 and dataset["size_bytes"] == size, dataset
                    rows.append((label, before, peak, after, seconds))
        finally:
            sampler.stop()
            proc.terminate()
            proc.wait(10)
            await server.stop(None)

    print(f"file: {size / MiB:.1f} MiB ({size} bytes), sha256 verified at the fake catalog for every upload")
    print("| path | RSS before MiB | peak RSS MiB | RSS after MiB | peak growth MiB | growth / file size | MiB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, before, peak, after, seconds in rows:
        growth = peak - before
        print(
            f"| {label} | {before / MiB:.1f} | {peak / MiB:.1f} | {after / MiB:.1f} | {growth / MiB:.1f} "
            f"| {growth / size:.4f} | {size / MiB / seconds:.0f} |"
        )
    print("baseline: holding the file in memory would make growth / file size >= 1.0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated JSONL file in MB")
    parser.add_argument("--put-mb", type=int, default=16, help="bytes per resumable PUT, in MiB")
    args = parser.parse_args()
    asyncio.run(run(args.mb, args.put_mb))


if __name__ == "__main__":
    main()
