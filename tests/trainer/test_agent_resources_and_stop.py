"""The agent's side of scheduling: what it registers (GPUs, memory, labels, slots), and how it stops a run
whose reports the jobs service refuses (a real child process, terminated)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import psutil
import pytest
from pydantic import ValidationError

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge_trainer import agent as agent_mod
from tuneforge_trainer.agent import Agent, AgentSettings, Gpu, parse_labels

GIB = 1024**3


def test_labels_parse_from_key_value_pairs_and_bad_ones_fail_at_startup(monkeypatch):
    assert parse_labels(" zone=eu, pool = a100 ,,gpu=") == {"zone": "eu", "pool": "a100", "gpu": ""}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="'oops' is not key=value"):
        parse_labels("zone=eu,oops")
    monkeypatch.setenv("TUNEFORGE_AGENT_LABELS", "zone=eu,=x")
    with pytest.raises(ValidationError):
        AgentSettings()
    monkeypatch.setenv("TUNEFORGE_AGENT_LABELS", "zone=eu,tier=gold")
    assert parse_labels(AgentSettings().agent_labels) == {"zone": "eu", "tier": "gold"}


def test_resources_report_gpus_memory_per_gpu_cpus_ram_labels_and_slots(monkeypatch):
    gpus = (Gpu("NVIDIA A100-SXM4-80GB", 80 * GIB), Gpu("NVIDIA A100-SXM4-40GB", 40 * GIB))
    monkeypatch.setattr(agent_mod, "detect_gpus", lambda python: gpus)
    res = Agent(AgentSettings(agent_slots=3, agent_labels="zone=eu")).resources()
    assert (res.gpu_count, list(res.gpu_models)) == (2, ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB"])
    assert res.gpu_memory_bytes == 40 * GIB  # per GPU: the smallest, so a job that fits one fits any
    assert res.memory_bytes == psutil.virtual_memory().total and res.cpu_count >= 1
    assert (dict(res.labels), res.slots) == ({"zone": "eu"}, 3)
    monkeypatch.setattr(agent_mod, "detect_gpus", lambda python: ())
    res = Agent(AgentSettings()).resources()
    assert (res.gpu_count, list(res.gpu_models), res.gpu_memory_bytes) == (0, [], 0)


def test_gpus_come_from_torch_first_then_nvidia_smi_and_none_without_a_driver(monkeypatch):
    agent_mod.detect_gpus.cache_clear()
    monkeypatch.setattr(agent_mod, "_gpu_devices_present", lambda: True)
    monkeypatch.setattr(agent_mod, "_torch_gpus", lambda python: [Gpu("from torch", 1)])
    monkeypatch.setattr(agent_mod, "_nvidia_smi_gpus", lambda: [Gpu("from nvidia-smi", 2)])
    assert agent_mod.detect_gpus("py-a") == (Gpu("from torch", 1),)
    monkeypatch.setattr(agent_mod, "_torch_gpus", lambda python: None)  # no torch, or it sees no GPU
    assert agent_mod.detect_gpus("py-b") == (Gpu("from nvidia-smi", 2),)
    monkeypatch.setattr(agent_mod, "_gpu_devices_present", lambda: False)
    assert agent_mod.detect_gpus("py-c") == ()
    agent_mod.detect_gpus.cache_clear()


def test_nvidia_smi_output_becomes_models_and_bytes(monkeypatch):
    out = "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n"
    monkeypatch.setattr(agent_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(
        agent_mod.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 0, stdout=out, stderr="")
    )
    assert agent_mod._nvidia_smi_gpus() == [Gpu("NVIDIA H100 80GB HBM3", 81559 * 1024 * 1024)] * 2


def test_the_torch_probe_runs_in_the_runners_interpreter_and_reads_its_answer(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "some warning"\necho \'[["NVIDIA L4", 24000000000]]\'\n')
    fake.chmod(0o755)
    assert agent_mod._torch_gpus(str(fake)) == [Gpu("NVIDIA L4", 24000000000)]
    # This machine's torch sees no GPU (CPU build): the probe says so rather than guessing.
    import torch

    if not torch.cuda.is_available():
        assert agent_mod._torch_gpus(sys.executable) is None
    assert agent_mod._torch_gpus(str(tmp_path / "missing")) is None


async def test_a_refused_attempt_is_terminated_and_reports_no_outcome(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            print("training", flush=True)
            time.sleep(60)
            """
        )
    )
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"text": "x"}\n')
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "work"), agent_terminate_grace_seconds=5))
    agent._start(
        apb.JobAssignment(
            job_id="job-1",
            attempt=1,
            entrypoint=str(script),
            model_uri=str(tmp_path),
            dataset_uri=str(dataset),
            output_uri=str(tmp_path / "out"),
        )
    )

    def states() -> list[int]:
        return [p.request.state.state for p in agent.reporter.pending if p.request.WhichOneof("report") == "state"]

    for _ in range(200):
        if any(p.request.log.text == "training" for p in agent.reporter.pending):
            break
        await asyncio.sleep(0.05)
    run = agent.runs["job-1"]
    assert states() == [apb.REPORTED_STATE_RUNNING]
    agent.reporter.on_stop("job-1", 2, "not this attempt")  # another attempt's stop leaves this run alone
    assert not run.cancelled
    agent.reporter.on_stop("job-1", 1, "attempt 1 of job job-1 was superseded by attempt 2")
    for _ in range(200):
        if not agent.runs:
            break
        await asyncio.sleep(0.05)
    assert not agent.runs and run.proc is not None and run.proc.returncode == -15  # SIGTERM
    assert run.fenced.startswith("attempt 1 of job job-1 was superseded")
    assert states() == [apb.REPORTED_STATE_RUNNING]  # no CANCELLED or FAILED: the job is not this run's to end
