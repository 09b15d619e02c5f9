"""Memory during a large dataset upload, end to end: peak RSS growth of the gateway and catalog processes.

By default the real catalog runs as its own process (`python -m tuneforge_catalog`, a SQLite database, an
artifact root and its temporary files all in a temporary directory) and the gateway (`python -m
tuneforge_gateway`) runs in front of it. A JSONL file of valid, varied chat rows is written to the temporary
directory and uploaded through the gateway's multipart route and through its resumable routes (each streamed by
httpx from disk, then over the gateway's UploadDataset gRPC stream to the catalog, which stores and validates
it), then over the gRPC stream straight to the catalog from this process in 1 MiB chunks. A thread samples the
RSS of both processes (children included) with psutil. The baseline is the file itself: a process that held the
upload in memory would grow by at least the file size (ratio >= 1); a streaming one stays near 0.

The catalog keeps content by its sha256, so the second and third uploads of the same bytes store no new
content (they still make a new dataset each, validated again). The catalog's answer waits for validation up to
TUNEFORGE_CATALOG_VALIDATION_WAIT_SECONDS, set here to 300 s so that it carries READY rather than VALIDATING;
the validation time is the answer's arrival minus the dataset's create_time (the catalog sets it once the
content is stored, just before validating).

--fake-catalog measures the gateway alone, in front of a fake CatalogService in this process that hashes and
discards the chunks it receives. Every temporary file is deleted at the end.

    python bench/bench_upload_memory.py [--mb 200] [--put-mb 16] [--fake-catalog]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge_common.grpcutil import ServiceBinding, start_server

MiB = 1024 * 1024
GRPC_CHUNK = MiB
VALIDATION_WAIT_S = 300


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
    """Samples the resident set size of processes (each with its children) in one thread.

    `peak[name]` is the largest total seen for that process since `reset`.
    """

    def __init__(self, pids: dict[str, int], interval_s: float = 0.002, children_every_s: float = 0.5) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval_s, self.children_every_s = interval_s, children_every_s
        self._children: dict[str, list[psutil.Process]] = {name: [] for name in pids}
        self._children_at = 0.0
        self._refresh_children()
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _refresh_children(self) -> None:
        for name, process in self.processes.items():
            try:
                self._children[name] = process.children(recursive=True)
            except psutil.NoSuchProcess:
                self._children[name] = []
        self._children_at = time.monotonic()

    @staticmethod
    def _rss(process: psutil.Process) -> int:
        try:
            return int(process.memory_info().rss)
        except psutil.NoSuchProcess:
            return 0

    def now(self) -> dict[str, int]:
        return {
            name: self._rss(process) + sum(self._rss(child) for child in self._children[name])
            for name, process in self.processes.items()
        }

    def reset(self) -> dict[str, int]:
        self._refresh_children()
        self.peak = self.now()
        return dict(self.peak)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - self._children_at > self.children_every_s:
                self._refresh_children()
            sample = self.now()
            self.peak = {name: max(self.peak[name], sample[name]) for name in sample}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


WORDS = (
    "adapter rank matrix layer gradient batch epoch token context window learning rate warmup schedule "
    "optimizer weight decay checkpoint evaluation loss perplexity dataset validation split prompt answer "
    "model base merge quantize precision memory stream chunk upload catalog gateway service queue worker "
    "cluster node device kernel attention head embedding vocabulary sequence length padding truncation "
    "sample seed shuffle metric accuracy recall summary question explain describe compare why how when "
    "small large fast slow stable noisy careful simple clear short long first last every each other"
).split()
SYSTEM_PROMPTS = ("You are a concise assistant.", "Answer as a patient teacher.", "Reply in plain words.")


def _sentence(rng: random.Random, low: int, high: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    return " ".join(words).capitalize() + rng.choice((".", "?", "!", "."))


def _chat_row(rng: random.Random, i: int) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for turn in range(rng.choice((1, 1, 1, 2, 3))):
        question = f"Question {i}.{turn}: " + " ".join(_sentence(rng, 4, 14) for _ in range(rng.randint(1, 3)))
        answer = " ".join(_sentence(rng, 5, 20) for _ in range(rng.randint(1, 4)))
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path: Path, size: int, seed: int = 0) -> tuple[str, int]:
    """About `size` bytes of valid, varied chat rows (whole lines); returns the sha256 and the row count."""
    rng, digest, written, rows, buffer = random.Random(seed), hashlib.sha256(), 0, 0, []
    with path.open("wb") as f:
        while True:
            line = (json.dumps(_chat_row(rng, rows), ensure_ascii=False) + "\n").encode()
            if written + len(line) > size:
                break
            buffer.append(line)
            written, rows = written + len(line), rows + 1
            if len(buffer) >= 4096:
                block = b"".join(buffer)
                f.write(block)
                digest.update(block)
                buffer.clear()
        block = b"".join(buffer)
        f.write(block)
        digest.update(block)
    return digest.hexdigest(), rows


def file_pieces(path: Path, start: int, length: int, piece_bytes: int = MiB) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        while length > 0:
            piece = f.read(min(piece_bytes, length))
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


def upload_grpc(catalog_address: str, path: Path) -> dict:
    """UploadDataset straight to the catalog: the metadata, then the file in 1 MiB chunks."""

    def requests() -> Iterator[cpb.UploadDatasetRequest]:
        yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name="bench"))
        for piece in file_pieces(path, 0, path.stat().st_size, GRPC_CHUNK):
            yield cpb.UploadDatasetRequest(chunk=piece)

    with grpc.insecure_channel(catalog_address) as channel:
        resp = catalog_pb2_grpc.CatalogServiceStub(channel).UploadDataset(requests(), timeout=900)
    d = resp.dataset
    return {
        "id": d.id,
        "sha256": d.sha256,
        "size_bytes": d.size_bytes,
        "row_count": d.row_count,
        "status": compb.DatasetStatus.Name(d.status).removeprefix("DATASET_STATUS_"),
        "create_time": d.create_time.ToDatetime(dt.UTC).isoformat() if d.HasField("create_time") else "",
    }


def start_service(module: str, env: dict[str, str], ready_prefix: str) -> tuple[subprocess.Popen[str], str]:
    """Starts `python -m module` and waits for its TUNEFORGE_READY line; returns the process and that line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module], env=os.environ | env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(ready_prefix):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, line.strip()
    raise RuntimeError(f"{module} exited with {proc.wait()} before it was ready")


def _port(ready_line: str, key: str) -> int:
    fields = dict(part.split("=", 1) for part in ready_line.split() if "=" in part)
    return int(fields[key])


def start_gateway(catalog_address: str, tmp: Path, max_bytes: int) -> tuple[subprocess.Popen[str], int]:
    env = {
        "TUNEFORGE_CATALOG_ADDRESS": catalog_address,
        "TUNEFORGE_JOBS_ADDRESS": catalog_address,
        "TUNEFORGE_GATEWAY_PORT": "0",
        "TUNEFORGE_GATEWAY_UPLOAD_DIR": str(tmp / "spool"),
        "TUNEFORGE_GATEWAY_MAX_UPLOAD_BYTES": str(max_bytes),
        "TUNEFORGE_LOG_LEVEL": "WARNING",
        "TMPDIR": str(tmp / "gateway-tmp"),  # multipart parts spill to disk here
    }
    (tmp / "gateway-tmp").mkdir()
    proc, line = start_service("tuneforge_gateway", env, "TUNEFORGE_READY gateway http=")
    return proc, _port(line, "http")


def start_catalog(tmp: Path, max_bytes: int) -> tuple[subprocess.Popen[str], int]:
    env = {
        "TUNEFORGE_CATALOG_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'catalog.db'}",
        "TUNEFORGE_ARTIFACT_ROOT": str(tmp / "artifacts"),
        "TUNEFORGE_CATALOG_GRPC_PORT": "0",
        "TUNEFORGE_METRICS_PORT": "-1",  # no /metrics server
        "TUNEFORGE_CATALOG_MAX_DATASET_BYTES": str(max_bytes),
        "TUNEFORGE_CATALOG_VALIDATION_WAIT_SECONDS": str(VALIDATION_WAIT_S),
        "TUNEFORGE_JOBS_ADDRESS": "127.0.0.1:1",  # not used by uploads
        "TUNEFORGE_LOG_LEVEL": "WARNING",
        "TMPDIR": str(tmp / "catalog-tmp"),  # the upload is spooled here before it is stored
    }
    (tmp / "catalog-tmp").mkdir()
    proc, line = start_service("tuneforge_catalog", env, "TUNEFORGE_READY catalog grpc=")
    return proc, _port(line, "grpc")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class Result:
    label: str
    before: dict[str, int]
    peak: dict[str, int]
    after: dict[str, int]
    started: float  # wall clock
    seconds: float
    answered: float  # wall clock
    dataset: dict
    content_was_stored: bool  # same bytes already in the artifact store before this upload


def _created(dataset: dict) -> float | None:
    value = dataset.get("create_time") or ""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def report(results: list[Result], size: int, rows: int, real: bool) -> None:
    where = "the catalog (stored and validated)" if real else "the fake catalog"
    print(f"file: {size / MiB:.1f} MiB ({size} bytes, {rows} chat rows), sha256 verified at {where} for every upload")
    for r in results:
        d = r.dataset
        print()
        print(f"### {r.label}")
        line = f"end to end {r.seconds:.1f} s, {size / MiB / r.seconds:.0f} MiB/s"
        created = _created(d) if real else None
        if created is not None:
            line += (
                f"; content stored by the catalog {created - r.started:.1f} s after the start, "
                f"validation {r.answered - created:.1f} s (answer - create_time)"
            )
        print(line)
        content = "already in the artifact store (dedup by sha256)" if r.content_was_stored else "stored new"
        extra = f", row_count {d.get('row_count')}, content {content}" if real else ""
        print(f"dataset: status {d.get('status')}{extra}")
        print("| process | RSS before MiB | peak RSS MiB | RSS after MiB | peak growth MiB | growth / file size |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in r.peak:
            growth = r.peak[name] - r.before[name]
            print(
                f"| {name} | {r.before[name] / MiB:.1f} | {r.peak[name] / MiB:.1f} | {r.after[name] / MiB:.1f} "
                f"| {growth / MiB:.1f} | {growth / size:.4f} |"
            )
    print()
    print("baseline: holding the file in memory would make growth / file size >= 1.0")
    if real:
        print(f"catalog validation wait: {VALIDATION_WAIT_S} s (the answer carries the validated status)")


async def run(mb: int, put_mb: int, fake: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "big.jsonl"
        sha256, rows = await asyncio.to_thread(write_jsonl, path, mb * 1000 * 1000)
        size = path.stat().st_size
        max_bytes = max(2 * size, 512 * MiB)
        server = catalog = gateway = None
        sampler: PeakRss | None = None
        try:
            if fake:
                server, port = await start_server(
                    [ServiceBinding(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, HashingCatalog(), "bench")],
                    "127.0.0.1",
                    0,
                )
            else:
                catalog, port = await asyncio.to_thread(start_catalog, tmp, max_bytes)
            catalog_address = f"127.0.0.1:{port}"
            gateway, http_port = await asyncio.to_thread(start_gateway, catalog_address, tmp, max_bytes)
            pids = {"gateway": gateway.pid} | ({"catalog": catalog.pid} if catalog else {})
            sampler = PeakRss(pids)
            results = await asyncio.to_thread(
                measure, sampler, tmp, path, sha256, http_port, catalog_address, put_mb, real=catalog is not None
            )
        finally:
            if sampler:
                sampler.stop()
            for proc in (gateway, catalog):
                if proc:
                    stop(proc)
            if server:
                await server.stop(None)
        for r in results:
            assert r.dataset["sha256"] == sha256 and int(r.dataset["size_bytes"]) == size, r.dataset
            if catalog:
                assert r.dataset["status"] == "READY" and int(r.dataset["row_count"]) == rows, r.dataset
    report(results, size, rows, real=not fake)


def measure(
    sampler: PeakRss, tmp: Path, path: Path, sha256: str, http_port: int, catalog_address: str, put_mb: int, real: bool
) -> list[Result]:
    artifacts = tmp / "artifacts"
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=900) as client:
        # Warm-up: a first small upload of each kind loads the code paths the large one takes.
        small = tmp / "small.jsonl"
        write_jsonl(small, 100_000, seed=1)
        upload_multipart(client, small)
        upload_resumable(client, small, put_mb * MiB)
        if real:
            upload_grpc(catalog_address, small)
        small.unlink()

        size = path.stat().st_size
        paths: list[tuple[str, Callable[[], dict]]] = [
            (
                "multipart POST /api/v1/datasets -> gateway -> gRPC stream" + (" -> catalog" if real else ""),
                lambda: upload_multipart(client, path),
            ),
            (
                f"resumable PUT x{-(-size // (put_mb * MiB))} ({put_mb} MiB each) + complete -> gateway -> gRPC stream"
                + (" -> catalog" if real else ""),
                lambda: upload_resumable(client, path, put_mb * MiB),
            ),
        ]
        if real:
            paths.append(
                (
                    f"gRPC UploadDataset straight to the catalog, {GRPC_CHUNK // MiB} MiB chunks (no gateway)",
                    lambda: upload_grpc(catalog_address, path),
                )
            )
        results = []
        for label, upload in paths:
            stored = real and any(artifacts.rglob(f"{sha256}.jsonl"))  # content is named by its sha256
            before = sampler.reset()
            started, t0 = time.time(), time.perf_counter()
            dataset = upload()
            seconds, answered = time.perf_counter() - t0, time.time()
            peak, after = dict(sampler.peak), sampler.now()
            if label.startswith("gRPC"):  # the gateway takes no part in this path
                for d in (before, peak, after):
                    d.pop("gateway", None)
            results.append(Result(label, before, peak, after, started, seconds, answered, dataset, stored))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated JSONL file in MB")
    parser.add_argument("--put-mb", type=int, default=16, help="bytes per resumable PUT, in MiB")
    parser.add_argument(
        "--fake-catalog",
        action="store_true",
        help="measure the gateway alone, in front of an in-process fake catalog that hashes and discards chunks",
    )
    args = parser.parse_args()
    asyncio.run(run(args.mb, args.put_mb, args.fake_catalog))


if __name__ == "__main__":
    main()
