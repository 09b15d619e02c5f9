"""Added methods on the agent: the environment a method names becomes its interpreter, its stage file is
found only inside the methods directory, multi-GPU jobs start under torchrun on the GPUs the agent gave
them, and a failed run says why (real child processes; no GPU needed)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge_trainer import agent as agent_mod
from tuneforge_trainer.agent import (
    OOM_HINT,
    Agent,
    AgentSettings,
    Gpu,
    LaunchError,
    build_command,
    build_saving_command,
    conda_envs_dirs,
    failure_reason,
    resolve_launch,
    resolve_python_env,
    resolve_stage_file,
    saving_failure_reason,
    visible_devices,
)

FLAGS = ["--model_path=/m", "--dataset_path=/d.jsonl", "--output_dir=/o", "--resume_from_checkpoint="]


def fake_python(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


# --- environments -----------------------------------------------------------------------------------


def test_a_mapped_name_is_a_venv_directory_or_an_interpreter_kept_as_given(tmp_path):
    venv = tmp_path / "venvs" / "team"
    python = fake_python(venv / "bin" / "python")
    other = fake_python(tmp_path / "opt" / "py311" / "bin" / "python3.11")
    explicit = {"team": str(venv), "py311": str(other)}
    assert resolve_python_env("team", explicit, "/agent/python", {}, tmp_path) == str(python)
    assert resolve_python_env("py311", explicit, "/agent/python", {}, tmp_path) == str(other)
    # A real venv's bin/python is a symlink to the base interpreter: resolving it would leave the venv.
    real = make_venv(tmp_path / "real")
    found = resolve_python_env("real", {"real": str(real)}, "/agent/python", {}, tmp_path)
    assert found == str(real / "bin" / "python") and Path(found).is_symlink()


def test_base_or_no_environment_is_the_agents_own_interpreter_unless_mapped(tmp_path):
    assert resolve_python_env("", {}, "/agent/python", {}, tmp_path) == "/agent/python"
    assert resolve_python_env("base", {}, "/agent/python", {}, tmp_path) == "/agent/python"
    mapped = fake_python(tmp_path / "conda" / "bin" / "python")
    assert resolve_python_env("base", {"base": str(mapped)}, "/agent/python", {}, tmp_path) == str(mapped)


def test_a_conda_environment_is_found_in_the_envs_directories_conda_uses(tmp_path):
    home, root = tmp_path / "home", tmp_path / "miniconda3"
    environ = {
        "CONDA_ENVS_PATH": f"{tmp_path / 'shared-envs'}{os.pathsep}{tmp_path / 'more-envs'}",
        "CONDA_PREFIX": str(root / "envs" / "active"),  # inside an activated env: <root>/envs/<name>
        "CONDA_EXE": str(root / "bin" / "conda"),
    }
    assert conda_envs_dirs(environ, home) == [
        tmp_path / "shared-envs",
        tmp_path / "more-envs",
        root / "envs",  # once, though both CONDA_PREFIX and CONDA_EXE lead there
        home / ".conda" / "envs",
    ]
    assert conda_envs_dirs({"CONDA_PREFIX": str(root)}, home)[0] == root / "envs"  # base: <root> itself

    in_root = fake_python(root / "envs" / "qwen-sft" / "bin" / "python")
    assert resolve_python_env("qwen-sft", {}, "/agent/python", environ, home) == str(in_root)
    in_home = fake_python(home / ".conda" / "envs" / "mine" / "bin" / "python")
    assert resolve_python_env("mine", {}, "/agent/python", environ, home) == str(in_home)
    shadowing = fake_python(tmp_path / "more-envs" / "mine" / "bin" / "python")  # CONDA_ENVS_PATH comes first
    assert resolve_python_env("mine", {}, "/agent/python", environ, home) == str(shadowing)


def test_an_unknown_environment_fails_naming_it_and_every_place_looked_at(tmp_path):
    environ = {"CONDA_EXE": str(tmp_path / "conda" / "bin" / "conda")}
    with pytest.raises(LaunchError) as err:
        resolve_python_env("ghost", {}, "/agent/python", environ, tmp_path / "home")
    assert str(err.value) == (
        "python_env 'ghost': no Python interpreter found (not in agent_python_envs (TUNEFORGE_AGENT_PYTHON_ENVS) "
        f"nor a conda environment); looked at {tmp_path}/conda/envs/ghost/bin/python, "
        f"{tmp_path}/home/.conda/envs/ghost/bin/python"
    )
    not_a_venv = tmp_path / "empty"
    not_a_venv.mkdir()
    with pytest.raises(LaunchError, match=r"agent_python_envs maps it to .*empty\); looked at .*empty/bin/python,"):
        resolve_python_env("team", {"team": str(not_a_venv)}, "/agent/python", {}, tmp_path)


def test_python_envs_setting_is_name_equals_path_and_a_bad_one_fails_at_startup(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_AGENT_PYTHON_ENVS", "team=/opt/venvs/team, py=/usr/bin/python3")
    assert agent_mod.parse_python_envs(AgentSettings().agent_python_envs) == {
        "team": "/opt/venvs/team",
        "py": "/usr/bin/python3",
    }
    monkeypatch.setenv("TUNEFORGE_AGENT_PYTHON_ENVS", "team")
    with pytest.raises(ValidationError, match="'team' is not name=/path/to/python-or-venv"):
        AgentSettings()


# --- stage files ------------------------------------------------------------------------------------


def test_a_stage_file_resolves_only_inside_the_methods_directory(tmp_path):
    methods = tmp_path / "methods"
    script = methods / "team" / "train.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    outside = tmp_path / "secret.py"
    outside.write_text("")
    assert resolve_stage_file(methods, "team/train.py") == script
    (methods / "team" / "latest.py").symlink_to(script)  # a link that stays inside is fine
    assert resolve_stage_file(methods, "team/latest.py") == script

    for file in ("../secret.py", "team/../../secret.py", str(outside), "~/train.py", ""):
        with pytest.raises(LaunchError, match="must be a path relative to the methods directory"):
            resolve_stage_file(methods, file)
    (methods / "escape.py").symlink_to(outside)
    (methods / "linked").symlink_to(tmp_path)
    for file in ("escape.py", "linked/secret.py"):
        with pytest.raises(LaunchError, match=f"leads to {outside}, outside the methods directory {methods}"):
            resolve_stage_file(methods, file)
    with pytest.raises(LaunchError) as err:
        resolve_stage_file(methods, "team/missing.py")
    assert str(err.value) == f"entrypoint 'team/missing.py': no such file {script.parent}/missing.py " + (
        f"(methods directory {methods})"
    )


def test_the_methods_directory_defaults_to_methods_next_to_the_work_dir(tmp_path):
    assert AgentSettings(agent_work_dir=str(tmp_path / "agent")).methods_dir() == tmp_path / "methods"
    assert AgentSettings(agent_methods_dir=str(tmp_path / "m")).methods_dir() == tmp_path / "m"


def test_a_launch_names_both_an_unknown_env_and_a_missing_file_and_builtins_run_as_modules(tmp_path):
    settings = AgentSettings(agent_work_dir=str(tmp_path / "agent"), agent_python="/agent/python")
    home = tmp_path / "home"
    with pytest.raises(LaunchError) as err:
        resolve_launch(settings, "team/train.py", "ghost", {}, home)
    assert str(err.value).startswith("python_env 'ghost': no Python interpreter found")
    assert f"; entrypoint 'team/train.py': no such file {tmp_path}/methods/team/train.py" in str(err.value)

    builtin = resolve_launch(settings, "tuneforge_trainer.methods.sft_lora", "", {}, home)
    assert (builtin.python, builtin.target, builtin.is_script) == (
        "/agent/python",
        "tuneforge_trainer.methods.sft_lora",
        False,
    )
    script = tmp_path / "methods" / "team" / "train.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    python = fake_python(home / ".conda" / "envs" / "team" / "bin" / "python")
    added = resolve_launch(settings, "team/train.py", "team", {}, home)
    assert (added.python, added.target, added.script_dir) == (str(python), str(script), str(script.parent))
    # An added method's file is relative; an absolute one is refused even when it exists.
    with pytest.raises(LaunchError, match="must be a path relative"):
        resolve_launch(settings, str(script), "team", {}, home)


# --- commands -------------------------------------------------------------------------------------


def test_commands_follow_the_runner_contract_and_multi_gpu_jobs_start_under_torchrun():
    params = {"lora_rank": 8.0, "load_in_4bit": False, "learning_rate": 0.0002}
    flags = ["--lora_rank=8", "--load_in_4bit=false", "--learning_rate=0.0002", *FLAGS]
    args = (params, "/m", "/d.jsonl", "/o", "")
    assert build_command("py", "tuneforge_trainer.methods.sft_lora", *args) == [
        "py",
        "-m",
        "tuneforge_trainer.methods.sft_lora",
        *flags,
    ]
    assert build_command("/envs/team/bin/python", "/methods/team/train.py", *args) == [
        "/envs/team/bin/python",
        "/methods/team/train.py",
        *flags,
    ]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert build_command("py", "tuneforge_trainer.methods.sft_lora", *args, nproc_per_node=4) == [
        "py",
        *torchrun,
        "-m",
        "tuneforge_trainer.methods.sft_lora",
        *flags,
    ]
    assert build_command("/envs/team/bin/python", "/methods/team/train.py", *args, nproc_per_node=4) == [
        "/envs/team/bin/python",
        *torchrun,
        "/methods/team/train.py",
        *flags,
    ]


def test_the_saving_stage_gets_the_parameters_then_the_base_model_the_training_output_and_where_to_save():
    params = {"lora_rank": 8.0, "load_in_4bit": False, "output_dir": "/theirs"}
    assert build_saving_command(
        "/envs/save/bin/python", "/methods/team/save.py", params, "/m", "/o", "/o/complete"
    ) == [
        "/envs/save/bin/python",
        "/methods/team/save.py",
        "--lora_rank=8",
        "--load_in_4bit=false",
        "--output_dir=/o/complete",  # the agent's paths win over a parameter of the same name
        "--model_path=/m",
        "--adapter_path=/o",
    ]
    # One process even for a multi-GPU job, and a module runs with -m as a training's does.
    assert build_saving_command("py", "team.save", {}, "/m", "/o", "/o/complete")[:3] == ["py", "-m", "team.save"]


def test_a_failed_saving_stage_is_named_with_its_error_line():
    tail = ["Loading base", "save.py: error: --adapter_path: no adapter_config.json", "bye"]
    assert (
        saving_failure_reason(2, tail, False)
        == "saving stage failed: save.py: error: --adapter_path: no adapter_config.json"
    )
    assert saving_failure_reason(1, ["just this"], False) == "saving stage failed: just this"
    assert saving_failure_reason(1, [], False) == "saving stage failed: exited with code 1, no error output"
    assert saving_failure_reason(-9, [], False) == "saving stage failed: killed by signal 9, no error output"


def test_a_runner_sees_the_gpus_it_was_given_in_the_agents_own_numbering():
    assert visible_devices([0, 1], None) == "0,1"
    assert visible_devices([1], "") == "1"
    assert visible_devices([1, 2], "4,5,6,7") == "5,6"  # the agent itself was limited to GPUs 4-7
    assert visible_devices([0], "GPU-aa11, GPU-bb22") == "GPU-aa11"


def test_the_agent_gives_each_run_free_gpus_and_takes_them_back(monkeypatch):
    monkeypatch.setattr(agent_mod, "detect_gpus", lambda python: (Gpu("H100", 80),) * 4)
    agent = Agent(AgentSettings())
    agent.resources()
    assert agent._take_gpus("a", 2) == [0, 1] and agent._take_gpus("b", 1) == [2]
    assert agent._take_gpus("c", 2) == []  # the scheduler wouldn't send it; if it does, it runs unpinned
    assert agent._take_gpus("d", 0) == []  # asked for none: sees what the agent sees
    agent.resources()  # a reconnect registers again without forgetting what runs hold
    assert agent.free_gpus == [3]


# --- failure reasons ----------------------------------------------------------------------------------


def test_a_failure_reason_is_the_runs_last_error_line_else_its_last_stderr_line():
    tail = ["Traceback (most recent call last):", "usage: train.py [-h]", "train.py: error: bad --lora_rank", "bye"]
    assert failure_reason(2, tail, False) == "training process exited with code 2: train.py: error: bad --lora_rank"
    tail = ['  File "train.py", line 3', "ValueError: rows must be JSON"]
    assert failure_reason(1, tail, False) == "training process exited with code 1: ValueError: rows must be JSON"
    assert failure_reason(1, [], False) == "training process exited with code 1: no error output"
    torchrun = ["[rank1]: KeyError: 'answer'", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    assert failure_reason(1, torchrun, False) == "training process exited with code 1: [rank1]: KeyError: 'answer'"
    assert failure_reason(-9, [], False) == "training process was killed by SIGKILL: no error output"
    oom = ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert failure_reason(1, oom, True) == f"training process exited with code 1: {OOM_HINT} ({oom[0]})"
    assert len(failure_reason(1, ["x" * 5000], False)) < 600


# --- real runs through an in-process agent -------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


async def run_to_end(agent: Agent, assignment: apb.JobAssignment) -> tuple[list[apb.StateReport], list[str]]:
    """Start the job, wait for its run to end; its state reports and log lines."""
    agent._start(assignment)
    return await ended(agent)


async def until(condition, what: str, within: float = 90.0) -> None:
    """Wait for condition() (a loaded CI machine starts torchrun and its workers slowly); fail naming `what`."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def both_workers_started(agent: Agent) -> None:
    """Both torchrun workers printed "rank N training". They share torchrun's stdout, so two prints at the same
    moment can land on one log line: the ranks are looked for in the whole log, not line by line."""

    def ranks() -> set[str]:
        text = "\n".join(p.request.log.text for p in agent.reporter.pending)
        return set(re.findall(r"rank (\d) training", text))

    await until(lambda: ranks() == {"0", "1"}, "both workers to start", within=180)


async def ended(agent: Agent) -> tuple[list[apb.StateReport], list[str]]:
    await until(lambda: not agent.runs, "the run to end")
    reports = [p.request for p in agent.reporter.pending]
    states = [r.state for r in reports if r.WhichOneof("report") == "state"]
    return states, [r.log.text for r in reports if r.WhichOneof("report") == "log"]


def assignment(tmp_path: Path, entrypoint: str, python_env: str = "", **extra) -> apb.JobAssignment:
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"text": "x"}\n')
    return apb.JobAssignment(
        job_id="job-1",
        attempt=1,
        entrypoint=entrypoint,
        python_env=python_env,
        model_uri=str(tmp_path),
        dataset_uri=str(dataset),
        output_uri=str(tmp_path / "stored"),
        **extra,
    )


async def test_an_added_method_runs_its_file_in_its_own_environment_next_to_its_siblings(tmp_path, monkeypatch):
    methods = tmp_path / "methods"
    write(methods / "team" / "helpers.py", "GREETING = 'hello from a sibling'\n")
    write(
        methods / "team" / "train.py",
        """
        import json, os, sys
        from helpers import GREETING
        out = os.environ["OUTPUT_DIR"]
        os.makedirs(out, exist_ok=True)
        seen = {
            "argv": sys.argv[1:], "prefix": sys.prefix, "cwd": os.getcwd(), "greeting": GREETING,
            "lora_rank": os.environ.get("LORA_RANK"), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "virtual_env": os.environ.get("VIRTUAL_ENV"), "path0": os.environ["PATH"].split(os.pathsep)[0],
        }
        json.dump(seen, open(os.path.join(out, "seen.json"), "w"))
        print('[log_data]: {"code": 200, "progress": 100, "details": {"step": 1, "loss": 0.5}}', flush=True)
        """,
    )
    venv = make_venv(tmp_path / "venvs" / "team")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")  # this agent was given GPUs 6 and 7 of the node
    monkeypatch.setattr(agent_mod, "detect_gpus", lambda python: (Gpu("H100", 80),) * 2)
    settings = AgentSettings(
        agent_work_dir=str(tmp_path / "agent"),
        agent_python_envs=f"team={venv}",
        artifact_root=str(tmp_path / "artifacts"),
    )
    agent = Agent(settings)
    agent.resources()
    agent.free_gpus = [1]  # GPU 0 is busy with another run
    params = {"lora_rank": 4}
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(params)
    states, logs = await run_to_end(
        agent, assignment(tmp_path, "team/train.py", "team", gpu_count=1, parameters=struct)
    )
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_SUCCEEDED], states
    seen = json.loads((tmp_path / "stored" / "seen.json").read_text())
    assert seen["prefix"] == str(venv)  # the method's environment, not the agent's
    assert seen["greeting"] == "hello from a sibling"
    assert seen["cwd"] == str(tmp_path / "agent" / "job-1" / "attempt-1")
    assert "--lora_rank=4" in seen["argv"] and seen["lora_rank"] == "4"
    assert seen["devices"] == "7" and agent.free_gpus == [1]  # the agent's GPU 1 is the node's 7; given back
    assert seen["virtual_env"] is None and seen["path0"] == str(venv / "bin")
    assert any(f"with {venv}/bin/python (python_env 'team') on CUDA_VISIBLE_DEVICES=7" in line for line in logs)


async def test_an_unknown_environment_fails_the_job_before_anything_is_staged_or_started(tmp_path):
    write(tmp_path / "methods" / "team" / "train.py", "print('never')\n")
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent")))
    states, logs = await run_to_end(agent, assignment(tmp_path, "team/train.py", "no-such-env"))
    assert [s.state for s in states] == [apb.REPORTED_STATE_FAILED]  # never RUNNING
    assert states[0].reason.startswith("python_env 'no-such-env': no Python interpreter found")
    assert "looked at" in states[0].reason and "Traceback" not in states[0].reason
    assert logs[-1] == states[0].reason
    assert not (tmp_path / "agent" / "job-1" / "attempt-1" / "dataset.jsonl").exists()


async def test_a_failed_run_reports_its_error_line_and_logs_its_last_stderr_lines(tmp_path):
    script = write(
        tmp_path / "methods" / "fails.py",
        """
        import sys
        for i in range(30):
            print(f"warming up {i}", file=sys.stderr)
        print("error: --lora_rank: must be at most 256", file=sys.stderr)
        print("cleaning up", file=sys.stderr)
        sys.exit(2)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent")))
    states, logs = await run_to_end(agent, assignment(tmp_path, str(script)))
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_FAILED]
    assert states[-1].reason == "training process exited with code 2: error: --lora_rank: must be at most 256"
    block = logs[-1].splitlines()
    assert block[0] == "training process exited with code 2; last stderr lines:"
    assert block[1:] == [
        *(f"warming up {i}" for i in range(12, 30)),
        "error: --lora_rank: must be at most 256",
        "cleaning up",
    ]


async def test_cuda_out_of_memory_is_named_with_what_to_change(tmp_path):
    script = write(
        tmp_path / "methods" / "oom.py",
        """
        import sys
        print("Traceback (most recent call last):", file=sys.stderr)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", file=sys.stderr)
        print("[rank0]: process group destroyed", file=sys.stderr)
        sys.exit(1)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent")))
    states, _ = await run_to_end(agent, assignment(tmp_path, str(script)))
    assert states[-1].state == apb.REPORTED_STATE_FAILED
    assert states[-1].reason == (
        f"training process exited with code 1: {OOM_HINT} "
        "(torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB)"
    )


async def test_a_two_gpu_job_runs_under_torchrun_one_process_per_gpu(tmp_path):
    script = write(
        tmp_path / "methods" / "ranks.py",
        """
        import os
        rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
        print(f"rank {rank} of {world}", flush=True)
        if rank == "0":
            os.makedirs(os.environ["OUTPUT_DIR"], exist_ok=True)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent")))
    agent.free_gpus = []  # a CPU node: the job still runs, unpinned
    states, logs = await run_to_end(agent, assignment(tmp_path, str(script), gpu_count=2))
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_SUCCEEDED], logs[-5:]
    # The workers share torchrun's stdout: two prints at once can land on one line (the CI run saw it).
    assert set(re.findall(r"rank (\d) of 2", "\n".join(logs))) == {"0", "1"}, logs[-5:]
    assert any(line.endswith("under torchrun, 2 processes") for line in logs)


async def test_terminate_reaches_torchrun_workers_that_ignore_sigterm(tmp_path):
    script = write(
        tmp_path / "methods" / "stubborn.py",
        """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"rank {os.environ['RANK']} training", flush=True)
        time.sleep(120)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent"), agent_terminate_grace_seconds=1))
    agent._start(assignment(tmp_path, str(script), gpu_count=2))
    run = agent.runs["job-1"]
    await both_workers_started(agent)
    workers = agent_mod._children(run.proc.pid, recursive=False)  # type: ignore[union-attr]
    assert len(workers) == 2 and all(os.getsid(w.pid) == w.pid for w in workers)  # sessions of their own
    agent._cancel("job-1")
    states, _ = await ended(agent)
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_CANCELLED]
    assert not any(w.is_running() and w.status() != "zombie" for w in workers)


async def test_a_pause_under_torchrun_signals_the_workers_which_checkpoint_and_stop(tmp_path):
    script = write(
        tmp_path / "methods" / "pausable.py",
        """
        import os, signal, sys, time
        def pause(signum, frame):
            print(f"rank {os.environ['RANK']} saved a checkpoint", flush=True)
            sys.exit(75)  # the SDK's PAUSED_EXIT_CODE
        signal.signal(signal.SIGUSR1, pause)
        print(f"rank {os.environ['RANK']} training", flush=True)
        time.sleep(120)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent")))
    agent._start(assignment(tmp_path, str(script), gpu_count=2))
    await both_workers_started(agent)
    agent._cancel("job-1", checkpoint_first=True)
    states, logs = await ended(agent)
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_PAUSED]
    # The workers share torchrun's stdout: two prints at the same moment can land on one line.
    text = "\n".join(logs)
    assert "rank 0 saved a checkpoint" in text and "rank 1 saved a checkpoint" in text


# --- the saving stage -------------------------------------------------------------------------------------

TRAIN_THEN_SAVE = """
import os, sys
out = os.environ["OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "adapter.txt"), "w").write("trained")
print('[log_data]: {"code": 200, "progress": 100, "details": {"step": 2, "total_steps": 2, "loss": 0.5}}', flush=True)
"""


def saving_job(tmp_path: Path, saving_file: str, saving_env: str = "", **extra) -> apb.JobAssignment:
    write(tmp_path / "methods" / "team" / "train.py", TRAIN_THEN_SAVE)
    return assignment(
        tmp_path, "team/train.py", "base", saving_entrypoint=saving_file, saving_python_env=saving_env, **extra
    )


def metric_reports(agent: Agent) -> list[apb.MetricReport]:
    return [p.request.metric for p in agent.reporter.pending if p.request.WhichOneof("report") == "metric"]


async def test_the_saving_stage_runs_after_the_training_in_its_own_environment_and_its_output_is_stored(tmp_path):
    write(
        tmp_path / "methods" / "team" / "save.py",
        """
        import json, os, sys
        from helpers import NAME
        seen = {
            "argv": sys.argv[1:], "prefix": sys.prefix, "cwd": os.getcwd(), "name": NAME,
            "adapter": open(os.path.join(os.environ["ADAPTER_PATH"], "adapter.txt")).read(),
            "env": {k: os.environ.get(k) for k in ("MODEL_PATH", "ADAPTER_PATH", "OUTPUT_DIR", "LORA_RANK")},
        }
        os.makedirs(os.environ["OUTPUT_DIR"])
        json.dump(seen, open(os.path.join(os.environ["OUTPUT_DIR"], "seen.json"), "w"))
        print("merged", flush=True)
        print('[log_data]: {"code": 200, "progress": 100, "details": {"tensors_changed": 3}}', flush=True)
        """,
    )
    write(tmp_path / "methods" / "team" / "helpers.py", "NAME = 'a sibling of save.py'\n")
    venv = make_venv(tmp_path / "venvs" / "saver")
    settings = AgentSettings(
        agent_work_dir=str(tmp_path / "agent"), agent_python_envs=f"saver={venv}", artifact_root=str(tmp_path / "a")
    )
    agent = Agent(settings)
    from google.protobuf import struct_pb2

    params = struct_pb2.Struct()
    params.update({"lora_rank": 4})
    states, logs = await run_to_end(agent, saving_job(tmp_path, "team/save.py", "saver", parameters=params))
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_SUCCEEDED], logs[-5:]
    attempt = tmp_path / "agent" / "job-1" / "attempt-1"
    output = attempt / "output"
    seen = json.loads((tmp_path / "stored" / "complete" / "seen.json").read_text())
    assert (tmp_path / "stored" / "adapter.txt").read_text() == "trained"  # the training's output is stored too
    assert seen["argv"] == [
        "--lora_rank=4",
        f"--model_path={tmp_path}",
        f"--adapter_path={output}",
        f"--output_dir={output / 'complete'}",
    ]
    assert seen["env"] == {
        "MODEL_PATH": str(tmp_path),
        "ADAPTER_PATH": str(output),
        "OUTPUT_DIR": str(output / "complete"),
        "LORA_RANK": "4",
    }
    assert (seen["prefix"], seen["cwd"], seen["name"], seen["adapter"]) == (
        str(venv),
        str(attempt),
        "a sibling of save.py",
        "trained",
    )
    marker = (
        f"saving stage: running {tmp_path / 'methods' / 'team' / 'save.py'} with {venv}/bin/python (python_env 'saver')"
    )
    assert logs.index(marker) < logs.index("merged")
    assert [m.values for m in metric_reports(agent)] == [{"loss": 0.5}, {"tensors_changed": 3.0}]


async def test_a_saving_stage_that_fails_fails_the_job_and_a_missing_one_fails_it_before_training(tmp_path):
    write(
        tmp_path / "methods" / "team" / "save.py",
        """
        import sys
        print("Traceback (most recent call last):", file=sys.stderr)
        print("error: adapter_config.json missing in the training output", file=sys.stderr)
        sys.exit(1)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent")))
    states, logs = await run_to_end(agent, saving_job(tmp_path, "team/save.py", "base"))
    assert [s.state for s in states] == [apb.REPORTED_STATE_RUNNING, apb.REPORTED_STATE_FAILED]
    assert states[-1].reason == "saving stage failed: error: adapter_config.json missing in the training output"
    assert logs[-1].startswith("saving process exited with code 1; last stderr lines:\n")
    assert not (tmp_path / "stored").exists()

    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent2")))
    states, _ = await run_to_end(agent, saving_job(tmp_path, "../escape.py", "base"))
    assert [s.state for s in states] == [apb.REPORTED_STATE_FAILED]  # the training never started
    assert states[0].reason.startswith("saving stage: entrypoint '../escape.py': an added method's file must be")


@pytest.mark.parametrize("checkpoint_first", [False, True])
async def test_terminate_or_pause_during_the_saving_stage_stops_it(tmp_path, checkpoint_first):
    write(
        tmp_path / "methods" / "team" / "save.py",
        """
        import time
        print("saving", flush=True)
        time.sleep(120)
        """,
    )
    agent = Agent(AgentSettings(agent_work_dir=str(tmp_path / "agent"), agent_terminate_grace_seconds=1))
    agent._start(saving_job(tmp_path, "team/save.py", "base"))
    run = agent.runs["job-1"]
    await until(lambda: any(p.request.log.text == "saving" for p in agent.reporter.pending), "the saving stage")
    saver = run.proc
    assert saver is not None and run.stage == "saving"
    agent._cancel("job-1", checkpoint_first=checkpoint_first)
    states, _ = await ended(agent)
    assert saver.returncode is not None and saver.returncode < 0  # stopped, not waited for
    assert [s.state for s in states] == [
        apb.REPORTED_STATE_RUNNING,
        apb.REPORTED_STATE_PAUSED if checkpoint_first else apb.REPORTED_STATE_CANCELLED,
    ]
    if checkpoint_first:
        assert states[-1].reason.startswith("paused during the saving stage")
    assert not (tmp_path / "stored").exists()
