"""Warm runners (tuneforge_trainer.forkserver): a preloaded server forks each built-in stage's runner.

A real server process preloads torch and the rest, as on a node; a probe module stands in for a method so that
each property (argv, environment, directory, stdio, session, exit status, signals) can be read back exactly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from tuneforge_trainer.forkserver import SERVER_ENV, WarmRunners, differs_at_import, warm_module

PROBE = """
import os, signal, sys, time
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("env", os.environ.get("PROBE_VALUE"), os.environ.get("LEFT_OUT", "-"))
print("session leader", os.getsid(0) == os.getpid())
print("preloaded", "torch" in sys.modules and "trl" in sys.modules)
print("main", __name__)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "sleep":
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
    print("sleeping", flush=True)
    time.sleep(120)
raise SystemExit(int(sys.argv[2]))
"""


@pytest.fixture
async def warm(tmp_path):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "tfprobe.py").write_text(PROBE)
    env = {**os.environ, **SERVER_ENV, "PYTHONPATH": str(probe_dir)}
    # A Unix socket path must stay under ~107 bytes, which pytest's tmp_path may not.
    sock = Path(tempfile.mkdtemp(prefix="tfw-")) / "s"
    runners = WarmRunners(sys.executable, env, str(sock), modules=("tfprobe",))
    runners.start()
    await asyncio.wait_for(runners.ready.wait(), 180)
    assert not runners.failed
    yield runners
    await runners.close()


async def _read_all(stream: asyncio.StreamReader) -> list[str]:
    return [line.decode().rstrip("\n") async for line in stream]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tfprobe", *args]


async def test_a_warm_runner_gets_its_argv_env_directory_and_stdio_and_its_exit_code(warm, tmp_path):
    workdir = tmp_path / "attempt-1"
    workdir.mkdir()
    env = {**warm.env, "PROBE_VALUE": "x=1 y"}
    proc = await warm.spawn(_cmd("exit", "3", "--flag=a b"), env, str(workdir))
    assert proc is not None
    out, err = await asyncio.gather(_read_all(proc.stdout), _read_all(proc.stderr))
    assert await proc.wait() == 3 and proc.returncode == 3
    assert out == [
        "argv ['exit', '3', '--flag=a b']",
        f"cwd {workdir}",
        "env x=1 y -",
        "session leader True",
        "preloaded True",  # forked from the server: torch and TRL were imported before the job came
        "main __main__",
    ]
    assert err == ["to stderr"]
    # Not the agent's child: the agent learns the exit from the server.
    assert proc.pid not in [c.pid for c in __import__("psutil").Process().children(recursive=True)]


async def test_signals_to_a_warm_runners_group_reach_it_and_its_exit_by_signal_reads_as_asyncio_says(warm, tmp_path):
    proc = await warm.spawn(_cmd("sleep", "0"), dict(warm.env), str(tmp_path))
    assert proc is not None
    assert (await proc.stdout.readline()).startswith(b"argv")
    while not (await proc.stdout.readline()).startswith(b"sleeping"):
        pass
    os.kill(proc.pid, signal.SIGUSR1)  # the pause signal: its own handler runs
    assert await asyncio.wait_for(proc.wait(), 30) == 75
    proc = await warm.spawn(_cmd("sleep", "0"), dict(warm.env), str(tmp_path))
    assert proc is not None
    while not (await proc.stdout.readline()).startswith(b"sleeping"):
        pass
    os.killpg(proc.pid, signal.SIGTERM)  # as the agent terminates a run
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGTERM


async def test_a_server_that_died_is_started_again_and_a_runner_it_left_still_reports_its_end(warm, tmp_path):
    running = await warm.spawn(_cmd("sleep", "0"), dict(warm.env), str(tmp_path))
    assert running is not None
    while not (await running.stdout.readline()).startswith(b"sleeping"):
        pass
    warm.proc.kill()  # the server dies; the runner it forked lives on, as a cold one outlives its agent
    await warm.proc.wait()
    os.kill(running.pid, signal.SIGKILL)
    assert await asyncio.wait_for(running.wait(), 30) == -signal.SIGKILL
    # The next stage waits for a new server (as long as a cold start would take) and is forked warm by it.
    proc = await asyncio.wait_for(warm.spawn(_cmd("exit", "0"), dict(warm.env), str(tmp_path)), 180)
    assert proc is not None
    assert await proc.wait() == 0


def test_only_the_agents_interpreter_running_a_built_in_module_is_forked_warm():
    python = "/venv/bin/python"
    assert warm_module([python, "-m", "tuneforge_trainer.methods.sft_lora", "--x=1"], python) == (
        "tuneforge_trainer.methods.sft_lora"
    )
    assert not warm_module([python, "/methods/train.py"], python)  # an added method's script
    assert not warm_module(["/other/env/bin/python", "-m", "tuneforge_trainer.methods.sft"], python)
    assert not warm_module([python, "-m", "torch.distributed.run", "--nproc_per_node=2"], python)  # torchrun
    assert not warm_module([python, "-I", "-S", "-c", "...", "1", python, "-m", "tuneforge_trainer.serve"], python)


def test_an_environment_that_changes_what_libraries_read_at_import_starts_cold():
    server = {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1", "HOME": "/root"}
    job = {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "HOME": "/root", "LORA_RANK": "8", "CUDA_VISIBLE_DEVICES": "1"}
    assert differs_at_import(job, server) == []  # parameters and the job's GPUs are read when it runs
    assert differs_at_import({**job, "OMP_NUM_THREADS": "4"}, server) == ["OMP_NUM_THREADS"]
    assert differs_at_import({**job, "HF_HUB_OFFLINE": "0"}, server) == ["HF_HUB_OFFLINE"]
    assert differs_at_import({k: v for k, v in job.items() if k != "HOME"}, server) == ["HOME"]
    runners = WarmRunners("/venv/bin/python", server, "/tmp/x.sock")
    assert "OMP_NUM_THREADS" in runners.reason_cold(
        ["/venv/bin/python", "-m", "tuneforge_trainer.methods.sft"], {**job, "OMP_NUM_THREADS": "4"}
    )


async def test_a_runner_left_by_a_dead_server_reports_its_end_while_a_later_runner_still_runs(warm, tmp_path):
    # The later runner was forked with the server's descriptors: it must not hold the earlier one's connection
    # open, or the agent never reads EOF there and waits for the later runner to end too.
    runners = []
    for _ in range(2):
        proc = await warm.spawn(_cmd("sleep", "0"), dict(warm.env), str(tmp_path))
        assert proc is not None
        while not (await proc.stdout.readline()).startswith(b"sleeping"):
            pass
        runners.append(proc)
    warm.proc.kill()
    await warm.proc.wait()
    first, later = runners
    os.kill(first.pid, signal.SIGKILL)
    try:
        assert await asyncio.wait_for(first.wait(), 30) == -signal.SIGKILL
        assert later.returncode is None
    finally:
        os.kill(later.pid, signal.SIGKILL)
    assert await asyncio.wait_for(later.wait(), 30) == -signal.SIGKILL
