"""`tuneforge up` as a process, as a user runs it: start it, read its banner (URL, first-start admin key), stop it
with Ctrl-C. The shared session stack is in conftest.py; a test that stops its stack starts its own here."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

STARTUP_S = 180
# After the URL line, how long to wait for the rest of the banner (the admin key comes with it).
BANNER_S = 10
BANNER_END = "Press Ctrl-C to stop"


class Stack:
    def __init__(self, proc: subprocess.Popen, url: str, data_dir: Path, output: list[str], key: str) -> None:
        self.proc, self.url, self.data_dir, self.output, self.key = proc, url, data_dir, output, key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, timeout=30, headers=headers)

    @property
    def api_key(self) -> str:
        """The OpenAI client's api_key: the admin key, or any string when the stack has no keys."""
        return self.key or "unused"


def _pump(stream, lines: queue.Queue[str | None], output: list[str]) -> None:
    """Reads the stack's stdout for as long as it runs, so a full pipe never blocks it."""
    for line in stream:
        output.append(line)
        lines.put(line)
    lines.put(None)


def start_stack(data_dir: Path) -> Stack:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("TUNEFORGE_NATS_URL", None)  # the embedded default starts its own NATS from the wheel
    cli = Path(sys.executable).parent / "tuneforge"
    proc = subprocess.Popen(
        [str(cli), "up", "--data-dir", str(data_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines, output), daemon=True).start()
    url = key = ""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:  # the process ended
            break
        if line.startswith("TUNEFORGE_GATEWAY_URL="):
            url = line.strip().split("=", 1)[1]
            deadline = min(deadline, time.monotonic() + BANNER_S)
        elif line.startswith("TUNEFORGE_ADMIN_KEY="):
            key = line.strip().split("=", 1)[1]
        elif url and BANNER_END in line:
            break
    if not url:
        stop_stack_process(proc)
        logs_dir = data_dir / "logs"
        logs = "".join((logs_dir / f).read_text()[-2000:] for f in os.listdir(logs_dir)) if logs_dir.is_dir() else ""
        pytest.fail("stack did not come up:\n" + "".join(output) + logs)
    return Stack(proc, url, data_dir, output, key)


def stop_stack_process(proc: subprocess.Popen) -> None:
    """Stop it the way a user does (Ctrl-C); whatever is left after 30 s is killed, children first."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(timeout=10)
