"""The artifact store fails while a checkpoint is being saved (issue 11): a full disk, a store remounted read-only.

The job ends FAILED with a reason naming the step, the URI and the OS error (no silent training on without
checkpoints); the checkpoints stored before stay byte-identical and loadable, still the resume point the service
lists; no partial checkpoint-N directory exists under a final name and no temporary directory is left behind.
Real agent process, real sft-lora runner on the tiny model, the jobs service on PostgreSQL, the store on a small
tmpfs mounted for the test. The put_dir tests and the in-process agent tests before them need no mount: a source
file that can't be read (EIO, even for root) fails a copy midway.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.integration.test_agent_failover import kill_with_children, serve_jobs, start_agent
from tests.reliability.conftest import scale
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge_common.artifacts import MARKER, ArtifactStore

# A file that exists and can't be read (EIO at offset 0), even for root: a source file failing mid-copy.
UNREADABLE = "/proc/self/mem"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256), hidden ones included."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_checkpoint(path: Path, label: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (path / "trainer_state.json").write_text(json.dumps({"label": label}))
    (path / "sub" / "optimizer.pt").write_bytes(os.urandom(8192))
    return path


def with_unreadable_file(path: Path) -> Path:
    # Sorted between the other files: the copy fails after some files were already written.
    (path / "rng_state.pth").symlink_to(UNREADABLE)
    return path


# --- put_dir, without mounts -----------------------------------------------------------------------------------


def test_put_dir_failing_mid_copy_leaves_no_partial_directory_and_the_previous_checkpoint_intact(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    store.put_dir(str(make_checkpoint(tmp_path / "src4", "4")), store.uri("checkpoints", "checkpoint-4"))
    parent = tmp_path / "store" / "checkpoints"
    before = tree_digest(parent / "checkpoint-4")
    src = with_unreadable_file(make_checkpoint(tmp_path / "src8", "8"))
    with pytest.raises(OSError) as raised:
        store.put_dir(str(src), store.uri("checkpoints", "checkpoint-8"))
    assert raised.value.errno == errno.EIO
    # Not a half-written checkpoint-8 (the old copy file by file left one), nor its temporary directory.
    assert sorted(p.name for p in parent.iterdir()) == ["checkpoint-4"]
    assert tree_digest(parent / "checkpoint-4") == before


def test_put_dir_replaces_a_stored_directory_whole_and_a_failed_replacement_keeps_the_old_one(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.uri("checkpoints", "checkpoint-8")
    target = tmp_path / "store" / "checkpoints" / "checkpoint-8"
    store.put_dir(str(make_checkpoint(tmp_path / "first", "first")), uri)
    second = make_checkpoint(tmp_path / "second", "second")
    (second / "only-in-second.txt").write_text("new")
    store.put_dir(str(second), uri)  # a later attempt saves the same step again
    assert tree_digest(target) == tree_digest(second)
    kept = tree_digest(target)
    with pytest.raises(OSError):
        store.put_dir(str(with_unreadable_file(make_checkpoint(tmp_path / "third", "third"))), uri)
    assert tree_digest(target) == kept
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint-8"]


def test_put_dir_on_an_object_store_writes_its_marker_last_and_removes_a_failed_prefix(tmp_path):
    # fsspec's memory filesystem stands for an object store: no directory rename there.
    root = f"memory://tf-{uuid.uuid4().hex}"
    store = ArtifactStore(root)
    fs = fsspec.filesystem("memory")
    try:
        src = make_checkpoint(tmp_path / "src", "4")
        store.put_dir(str(src), store.uri("checkpoint-4"))
        stored = {Path(p).name for p in fs.find(store.path_of(store.uri("checkpoint-4")))}
        assert stored == {"adapter_model.safetensors", "trainer_state.json", "optimizer.pt", MARKER}
        with pytest.raises(OSError):
            store.put_dir(str(with_unreadable_file(make_checkpoint(tmp_path / "bad", "8"))), store.uri("checkpoint-8"))
        assert not fs.exists(store.path_of(store.uri("checkpoint-8")))
        assert fs.exists(store.path_of(store.uri("checkpoint-4", MARKER)))
    finally:
        fs.rm(store.path_of(root), recursive=True)


# --- the agent, in-process, with a script for a runner ----------------------------------------------------------


def run_script(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An in-process agent running `body` as a job's training file; its reports stay in agent.reporter."""
    from tuneforge_trainer import agent as agent_mod

    monkeypatch.setattr(agent_mod, "STORE_RETRY_FIRST_SECONDS", 0.05)  # the tries, not the waits, are checked
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(body))
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    agent = agent_mod.Agent(
        agent_mod.AgentSettings(
            agent_work_dir=str(tmp_path / "work"),
            artifact_root=str(tmp_path / "store"),
            agent_terminate_grace_seconds=5,
        )
    )
    agent._start(
        apb.JobAssignment(
            job_id="job-1",
            attempt=1,
            entrypoint=str(script),
            model_uri=str(tmp_path),
            dataset_uri=str(tmp_path / "d.jsonl"),
            output_uri=str(tmp_path / "store" / "output"),
            checkpoint_uri=str(tmp_path / "store" / "checkpoints"),
        )
    )
    return agent


async def outcome(agent: Any) -> tuple[int, str]:
    for _ in range(600):
        if not agent.runs:
            break
        await asyncio.sleep(0.05)
    assert not agent.runs, "the run did not end"
    states = [p.request.state for p in agent.reporter.pending if p.request.WhichOneof("report") == "state"]
    return states[-1].state, states[-1].reason


async def test_a_checkpoint_that_cant_be_stored_stops_the_runner_and_fails_the_job_naming_step_uri_and_error(
    tmp_path, monkeypatch
):
    src = with_unreadable_file(make_checkpoint(tmp_path / "saved" / "checkpoint-4", "4"))
    agent = run_script(
        tmp_path,
        f"""
        import json, time
        print("[checkpoint]: " + json.dumps({{"step": 4, "path": "{src}", "metrics": {{}}}}), flush=True)
        time.sleep(120)  # trains on: the agent must stop it
        """,
        monkeypatch,
    )
    started = time.monotonic()
    state, reason = await outcome(agent)
    assert time.monotonic() - started < 60  # stopped, not run to its end
    assert state == apb.REPORTED_STATE_FAILED
    uri = f"{tmp_path / 'store' / 'checkpoints' / 'checkpoint-4'}"
    assert reason.startswith(f"checkpoint at step 4 could not be stored at {uri}: [Errno 5] Input/output error"), reason
    assert "(3 tries)" in reason and "latest stored: none" in reason
    assert not any(p.request.WhichOneof("report") == "checkpoint" for p in agent.reporter.pending)
    assert list((tmp_path / "store" / "checkpoints").iterdir()) == []


async def test_a_checkpoint_the_runner_rotated_away_before_its_copy_is_skipped_not_fatal(tmp_path, monkeypatch):
    agent = run_script(
        tmp_path,
        f"""
        import json
        print("[checkpoint]: " + json.dumps({{"step": 2, "path": "{tmp_path / "gone"}", "metrics": {{}}}}), flush=True)
        """,
        monkeypatch,
    )
    state, reason = await outcome(agent)
    assert state == apb.REPORTED_STATE_SUCCEEDED, reason
    assert not any(p.request.WhichOneof("report") == "checkpoint" for p in agent.reporter.pending)
    assert not (tmp_path / "store" / "checkpoints").exists()  # nothing stored for it, not even an empty one


async def test_an_output_that_cant_be_stored_fails_the_job_with_the_uri_and_error(tmp_path, monkeypatch):
    agent = run_script(
        tmp_path,
        f"""
        import os
        os.makedirs("{tmp_path / "work" / "job-1" / "attempt-1" / "output"}", exist_ok=True)
        os.symlink("{UNREADABLE}", "{tmp_path / "work" / "job-1" / "attempt-1" / "output" / "adapter.bin"}")
        """,
        monkeypatch,
    )
    state, reason = await outcome(agent)
    assert state == apb.REPORTED_STATE_FAILED
    uri = tmp_path / "store" / "output"
    assert reason == f"the output could not be stored at {uri}: [Errno 5] Input/output error (3 tries)"
    assert not (tmp_path / "store" / "output").exists()


# --- a real run whose store fails --------------------------------------------------------------------------------


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs where the jobs service and the agent keep artifacts; unmounted afterwards."""
    path = tmp_path / "artifacts"
    path.mkdir()
    mounted = sh("mount", "-t", "tmpfs", "-o", "size=32M", "tmpfs", str(path))
    assert mounted.returncode == 0, f"these tests mount a tmpfs (they run as root): {mounted.stderr}"
    try:
        yield path
    finally:
        if sh("umount", str(path)).returncode != 0:
            sh("umount", "-l", str(path))


def fill(path: Path) -> int:
    """Write one file until the filesystem is full; its size."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with (path / "filler").open("wb") as fh:
        try:
            while True:
                written += fh.write(chunk)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return written


def remount_read_only(path: Path, within: float = 10.0) -> None:
    """Remount read-only; the kernel refuses (EBUSY) while a file there is open for writing, so try again."""
    deadline = time.monotonic() + within
    while True:
        done = sh("mount", "-o", "remount,ro", str(path))
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.01)


def final_checkpoints(parent: Path) -> dict[str, dict[str, str]]:
    return {p.name: tree_digest(p) for p in sorted(parent.glob("checkpoint-*"))}


FAULTS = {
    "disk full": ("No space left on device", fill),
    "read-only": ("Read-only file system", remount_read_only),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_checkpoint_store_fault_fails_the_job_with_the_reason_and_keeps_earlier_checkpoints_intact(
    fault, postgres_url, tmp_path, small_store, figures
):
    error, inject = FAULTS[fault]
    jobs, server, port = await serve_jobs(postgres_url, tmp_path, lease_ttl_seconds=10)
    agent = start_agent("agent", port, tmp_path)
    try:
        # Many steps: a job that kept training without checkpoints would still be running, or end SUCCEEDED.
        job = await jobs.submit("tiny", "chat", "sft-lora", {"max_steps": scale(200, 400), "save_steps": 2})
        deadline = time.monotonic() + 180
        while not await jobs.checkpoints(job.id):
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-3000:]
            await asyncio.sleep(0.05)
        await asyncio.to_thread(inject, small_store)
        faulted_at = time.monotonic()
        parent = small_store / "jobs" / job.id / "checkpoints"
        before = final_checkpoints(parent)
        assert before, "the first checkpoint is stored before the fault"

        while (current := await jobs.get(job.id)).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            assert time.monotonic() - faulted_at < 120, "the job went on after its store failed"
            await asyncio.sleep(0.1)
        ended_after = time.monotonic() - faulted_at
        log = (tmp_path / "agent.log").read_text()[-3000:]
        assert current.state == "FAILED", f"{current.state}: {current.state_reason}\n{log}"
        reason = current.state_reason
        assert "could not be stored" in reason and error in reason, reason
        failed_step = int(reason.split("checkpoint at step ", 1)[1].split()[0])
        assert f"{parent}/checkpoint-{failed_step}" in reason  # the URI
        assert failed_step > max(int(n.split("-")[1]) for n in before)

        # What was stored before the fault is byte for byte what it was; nothing partial appeared since: each
        # directory under a final name is the runner's own checkpoint whole, and no temporary one is left.
        after = final_checkpoints(parent)
        for name, digest in before.items():
            assert after[name] == digest, name
        local = tmp_path / "agent" / job.id / "attempt-1" / "output"
        partial = [name for name, digest in after.items() if digest != tree_digest(local / name)]
        assert partial == []
        assert f"checkpoint-{failed_step}" not in after
        leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".")]
        if fault == "read-only":
            # The kernel remounts read-only only while no file is open for writing, so the fault lands between
            # stores, or (rarely) between two files of one: then the temporary can't be removed, as nothing can
            # on a read-only store. It is hidden under its temporary name, never taken for a checkpoint.
            assert all(re.fullmatch(r"\.checkpoint-\d+\.tmp-[0-9a-f]{32}", name) for name in leftovers), leftovers
        else:
            assert leftovers == []

        # The service's resume point is still the latest stored checkpoint, and it loads.
        kept = await jobs.checkpoints(job.id)
        assert kept and {f"checkpoint-{c.step}" for c in kept} <= set(after)
        resume = Path(kept[-1].uri)
        from safetensors.torch import load_file

        assert load_file(resume / "adapter_model.safetensors")
        assert json.loads((resume / "trainer_state.json").read_text())["global_step"] == kept[-1].step
        verified = sum((parent / name / f).stat().st_size for name, d in before.items() for f in d)

        # The fault itself is met at the next checkpoint (2 steps on); from the first failed store on, the
        # retries take STORE_RETRY_FIRST_SECONDS * (1 + 2), then the runner is stopped.
        lines = await jobs.logs(job.id, 0, 100_000)
        first_failure = next(line.recorded_at for line in lines if "failed" in line.text and "storing" in line.text)
        stopped_after = (current.ended_at - first_failure).total_seconds()
        assert stopped_after < 30, "the run was not stopped when its checkpoint could not be stored"
        figures.record(f"{fault}: seconds from the fault to the job's end", ended_after, "s", goal="< 60 s")
        figures.record(
            f"{fault}: seconds from the first failed store to the job's end", stopped_after, "s", goal="< 10 s"
        )
        figures.record(f"{fault}: bytes of earlier checkpoints verified identical", verified, "B", goal="> 0")
        figures.record(f"{fault}: partial checkpoint directories left under a final name", len(partial), goal="0")
        figures.record(f"{fault}: temporary directories left", len(leftovers), goal="0")
    finally:
        if agent.poll() is None:
            kill_with_children(agent)
        await server.stop(None)
        await jobs.engine.dispose()
        sh("mount", "-o", "remount,rw", str(small_store))
