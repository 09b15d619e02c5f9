"""Warm runners: one process per agent that has imported torch, transformers, PEFT and TRL before any job comes,
and forks a runner for each built-in stage instead of starting a new interpreter.

A cold `python -m tuneforge_trainer.methods.sft_lora` spends about 10 s of a 2-core machine importing those
libraries before it reads its first row; a forked one starts with them loaded (copy-on-write, so the pages are
shared), and a job's first step comes that much sooner (bench/bench_platform_overhead.py).

Server (`python -m tuneforge_trainer.forkserver SOCKET`): preloads, prints `ready` on stdout, then serves
requests on a Unix socket. A request is a JSON document (argv, env, cwd) with the runner's stdin, stdout and
stderr attached as file descriptors (SCM_RIGHTS). The server forks; the child leads a session of its own (so
the agent's killpg reaches it), takes those descriptors, the environment and the directory, and runs the
module as `python -m` would (runpy, as __main__). The server answers `{"pid": N}`, then `{"exit": code}` when
the child ends (code -N for a signal, as asyncio reports it): the agent is not the child's parent, so this is
how it learns the exit status.

Client (`WarmRunners`, used by the agent): starts the server when the agent starts, restarts it when it dies,
and spawns `WarmProcess`es with the interface of the asyncio subprocesses the agent otherwise starts. A command
is run warm only when it is exactly what the server can reproduce: the server's own interpreter running a
built-in module with `-m` (no torchrun, no script, no other environment), and an environment that differs from
the server's only in variables no preloaded library reads at import time (see `IMPORT_TIME`). Anything else,
or a server that is not ready, failed or stopped, starts cold as before.

CUDA: a process that initialised CUDA cannot fork a child that uses it. The server asks for the NVML-based
device check (PYTORCH_NVML_BASED_CUDA_CHECK), refuses to serve if its imports initialised CUDA anyway, and when
the node has NVIDIA GPUs it proves a forked child can allocate on one before it says ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What a runner imports before its first step (runner.py, supervised.py and the methods import them lazily).
PRELOAD = (
    "torch",
    "datasets",
    "transformers",
    "peft",
    "trl",
    "tuneforge_trainer.runner",
    "tuneforge_trainer.supervised",
    "tuneforge_trainer.data",
    "tuneforge_trainer.rewards",
)
# Names whose import is what takes the time (the packages above load most of theirs lazily).
PRELOAD_ATTRIBUTES = {
    "transformers": ("AutoModelForCausalLM", "AutoTokenizer", "PrinterCallback", "Trainer", "TrainingArguments"),
    "peft": ("LoraConfig", "PeftModel", "get_peft_model"),
    "trl": ("SFTConfig", "SFTTrainer", "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer"),
}
# Modules a warm runner may run: the built-in stages. The method modules themselves are not preloaded, so runpy
# runs each fresh as __main__, as `python -m` does.
WARM_MODULES = ("tuneforge_trainer.",)
# Variables read when a library is imported (thread pools, caches, offline mode, allocator, logging): a runner
# whose environment sets one differently from the server's would not get it, so it starts cold.
IMPORT_TIME = (
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "NUMEXPR_",
    "MALLOC_",
    "LD_",
    "PYTHON",
    "TORCH",
    "PYTORCH_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DATASETS_",
    "ACCELERATE_",
    "TRL_",
    "PEFT_",
    "BITSANDBYTES_",
    "XDG_",
    "TMPDIR",
    "HOME",
)
# Set for the server and every runner it forks (the agent sets the first two for every runner anyway).
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
READY = "ready"
_HEADER = struct.Struct("!I")
READY_TIMEOUT_S = 300.0


# -- server ---------------------------------------------------------------------------------------------------


def preload() -> list[str]:
    """Import what runners import; returns what could not be imported (an optional library not installed)."""
    import importlib

    missing: list[str] = []
    for name in PRELOAD:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # an optional library, or one broken here: the runner will say so itself
            missing.append(f"{name} ({type(exc).__name__})")
            continue
        for attribute in PRELOAD_ATTRIBUTES.get(name, ()):
            with contextlib.suppress(Exception):
                getattr(module, attribute)
    return missing


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _has_nvidia_gpu() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _child_can_use_cuda() -> bool:
    """Whether a forked child can allocate on a GPU (it can't when the parent's imports touched CUDA)."""
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if CUDA works here
        code = 1
        try:
            import torch

            torch.zeros(1, device="cuda")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < _HEADER.size:
        raise ConnectionError("short request")
    (size,) = _HEADER.unpack_from(data)
    body = bytearray(data[_HEADER.size :])
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), list(fds)


def _send_line(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the agent went away: the runner runs on regardless, as a cold one would
        conn.sendall(json.dumps(message).encode() + b"\n")


def _become_runner(request: dict[str, Any], fds: list[int], closing: list[int]) -> None:
    """In the forked child: turn into `python -m <module> args...` with the request's stdio, env and directory."""
    import atexit
    import random
    import runpy

    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        for fd in closing:
            with contextlib.suppress(OSError):
                os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # New text streams on the new descriptors, line by line as the agent reads them.
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (the process's own stdin)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()  # not the server's state: every runner would draw the same numbers
        argv: list[str] = request["argv"]
        module = argv[2]
        sys.argv = [module, *argv[3:]]
        sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(socket_path: str) -> int:
    """The server's main loop: preload, say ready, fork a runner per request, report each one's exit."""
    if sys.platform.startswith("linux"):
        import ctypes

        # It serves only its agent: when the agent dies, so does it (runners already forked go on, as cold
        # runners outlive a killed agent).
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    with contextlib.suppress(OSError):
        os.nice(10)  # preloading competes with the node's running jobs: it yields to them
    started = time.monotonic()
    missing = preload()
    with contextlib.suppress(OSError):
        os.nice(-10)  # needs privilege; where refused, runners forked from here keep the lower priority
    if _cuda_initialised():
        print("not serving: importing the libraries initialised CUDA, so forked runners could not use it", flush=True)
        return 3
    if _has_nvidia_gpu() and not _child_can_use_cuda():
        print("not serving: a forked child cannot use CUDA on this node", flush=True)
        return 3
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    note = f" (not importable: {', '.join(missing)})" if missing else ""
    print(f"{READY} preloaded in {time.monotonic() - started:.1f}s{note}", flush=True)

    selector = selectors.EpollSelector()  # Linux, as pidfd_open is
    selector.register(listener, selectors.EVENT_READ, None)
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the agent's connection)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                conn, _ = listener.accept()
                try:
                    request, fds = _recv_request(conn)
                except (OSError, ValueError) as exc:
                    _send_line(conn, {"error": f"bad request: {exc}"})
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    # Nothing of the server's stays open in a runner: an agent's connection held by another
                    # agent stage's runner would never read EOF when the server dies.
                    closing = [listener.fileno(), conn.fileno(), selector.fileno()]
                    closing += [fd for pidfd, (_, other) in running.items() for fd in (pidfd, other.fileno())]
                    _become_runner(request, fds, closing)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                running[pidfd] = (pid, conn)
                selector.register(pidfd, selectors.EVENT_READ, "exit")
                _send_line(conn, {"pid": pid})
            else:
                pidfd = key.fd
                pid, conn = running.pop(pidfd)
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                _send_line(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()


# -- client ---------------------------------------------------------------------------------------------------


def differs_at_import(env: Mapping[str, str], server_env: Mapping[str, str]) -> list[str]:
    """The variables of `env` that differ from the server's and that a preloaded library reads when imported
    (the server's own device-check switch aside: it only decides how the server looked for GPUs)."""
    keys = (set(env) | set(server_env)) - {"PYTORCH_NVML_BASED_CUDA_CHECK"}
    return sorted(k for k in keys if env.get(k) != server_env.get(k) and k.startswith(IMPORT_TIME))


def warm_module(cmd: list[str], python: str, modules: tuple[str, ...] = WARM_MODULES) -> str:
    """The built-in module `cmd` runs with the server's interpreter, or "" when it is any other command."""
    if len(cmd) < 3 or cmd[0] != python or cmd[1] != "-m":
        return ""
    return cmd[2] if cmd[2].startswith(modules) else ""


class WarmProcess:
    """A runner forked by the server, with what the agent uses of asyncio.subprocess.Process."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def _exit(self, code: int) -> None:
        if not self._exited.done():
            self.returncode = code
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


async def _pipe_reader(fd: int, limit: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(fd, "rb", 0))
    return reader


@dataclass
class WarmRunners:
    """The agent's fork server: started with the agent, restarted after it dies, asked for each eligible stage."""

    python: str
    env: dict[str, str]  # the server's environment (the agent's, less its secrets, with SERVER_ENV)
    socket_path: str
    line_limit: int = 1 << 20
    modules: tuple[str, ...] = WARM_MODULES  # what may be forked warm (module names or their prefixes)
    ready_timeout_s: float = READY_TIMEOUT_S
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str = ""  # why the last server did not serve
    _starting: asyncio.Task[None] | None = None
    _watchers: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def for_agent(cls, python: str, base_env: Mapping[str, str], line_limit: int) -> WarmRunners:
        # A Unix socket path is limited to ~107 bytes and work dirs may be deep: the agent's own, in the temp dir.
        path = Path(tempfile.gettempdir()) / f"tuneforge-warm-{os.getpid()}.sock"
        return cls(python, {**base_env, **SERVER_ENV}, str(path), line_limit)

    def start(self) -> None:
        if self._starting is None or self._starting.done():
            self.ready.clear()
            self._starting = asyncio.create_task(self._start(), name="warm-runners")

    async def _start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "tuneforge_trainer.forkserver",
            self.socket_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), self.ready_timeout_s)
        except TimeoutError:
            line = b"did not say ready in time"
        text = line.decode(errors="replace").strip()
        if text.startswith(READY):
            log.info("warm runners %s", text)
            self.failed = ""
            self.ready.set()
        else:
            self.failed = text or "exited before it was ready"
            log.warning("warm runners unavailable, stages start cold: %s", self.failed)
            await self.stop()
            return
        # Drain what it prints afterwards, and notice when it ends.
        await asyncio.gather(self._drain(self.proc.stdout), self._drain(self.proc.stderr))
        await self.proc.wait()
        self.ready.clear()
        log.warning("warm runner server exited with %s; restarting it", self.proc.returncode)

    async def _drain(self, stream: asyncio.StreamReader | None) -> None:
        while stream is not None and (line := await stream.readline()):
            log.debug("warm runners: %s", line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def close(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        await self.stop()

    def reason_cold(self, cmd: list[str], env: Mapping[str, str]) -> str:
        """Why this command must start cold; "" when it can be forked warm."""
        if not warm_module(cmd, self.python, self.modules):
            return "not a built-in module run with the agent's interpreter"
        if differing := differs_at_import(env, self.env):
            return f"its environment sets {', '.join(differing)}, read when libraries are imported"
        return ""

    async def spawn(self, cmd: list[str], env: dict[str, str], cwd: str) -> WarmProcess | None:
        """The command forked warm, or None when it must start cold (not eligible, or no server serving)."""
        if self.reason_cold(cmd, env):
            return None
        if not self.ready.is_set():
            if self._starting is None:
                return None  # never started
            if self._starting.done():
                self.start()  # it died: a new one, which this stage waits for as it would for a cold start
            try:
                await asyncio.wait_for(self.ready.wait(), self.ready_timeout_s)
            except TimeoutError:
                return None
            if self.failed:
                return None
        try:
            return await self._fork(cmd, env, cwd)
        except (OSError, ValueError, ConnectionError) as exc:
            log.warning("warm runner request failed (%s); starting cold", exc)
            return None

    async def _fork(self, cmd: list[str], env: dict[str, str], cwd: str) -> WarmProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        writer: asyncio.StreamWriter | None = None
        try:
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, self.socket_path)
                body = json.dumps({"argv": cmd, "env": env, "cwd": cwd}).encode()
                sock.setblocking(True)
                socket.send_fds(sock, [_HEADER.pack(len(body)) + body], [null, out_w, err_w])
                sock.setblocking(False)
            finally:
                for fd in (null, out_w, err_w):  # the runner has its own copies now, or there is no runner
                    os.close(fd)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            first = json.loads(await asyncio.wait_for(reader.readline(), 30) or b"{}")
            if "pid" not in first:
                raise ConnectionError(first.get("error", "the server answered no pid"))
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            if writer is not None:
                writer.close()
            else:
                sock.close()
            raise
        process = WarmProcess(
            int(first["pid"]),
            await _pipe_reader(out_r, self.line_limit),
            await _pipe_reader(err_r, self.line_limit),
        )
        watcher = asyncio.create_task(self._await_exit(process, reader, writer))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return process

    async def _await_exit(
        self, process: WarmProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await reader.readline()
            code = json.loads(line).get("exit") if line else None
        except (OSError, ValueError):
            code = None
        finally:
            writer.close()
        if code is None:
            # The server died first: the runner is no child of ours to wait for, so watch its pid go.
            await _gone(process.pid)
            code = -signal.SIGKILL  # its status went with the server: say it was killed, as it likely was
        process._exit(int(code))


async def _gone(pid: int) -> None:
    """Until the process ends (a pidfd becomes readable then, for any process, not only a child)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m tuneforge_trainer.forkserver SOCKET_PATH", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
