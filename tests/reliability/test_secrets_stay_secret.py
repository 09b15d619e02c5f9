"""Secrets never appear in logs or events: the real stack as processes (NATS, catalog and jobs on PostgreSQL
reached with a password in their URLs, a trainer agent, the gateway) is signed into, refused, given and
stripped of keys, runs a custom method's job to SUCCEEDED and another to FAILED; then every log file it
wrote, every job log line, every event on its NATS streams, every /metrics page, every error body and both
databases are searched for each secret and its obvious encodings. Keys are stored hashed only.

The custom method also checks, from inside the runner, that it runs in its job's work directory and that no
service secret reached its environment (the agent's environment used to be handed on whole: the service
token in a method's script is superuser over every project).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import text

from tests.helpers import write_fake_model_dir
from tuneforge_cli.embedded import BUILTIN_MODEL, EmbeddedStack
from tuneforge_common.auth import hash_secret
from tuneforge_common.db import make_engine
from tuneforge_trainer.agent import runner_env

from .conftest import scale

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "datasets" / "sample-chat.jsonl"
PG_PASSWORD = "pg-S3cret-" + os.urandom(6).hex()
JOB_TIMEOUT_S = scale(180, 600)

# A method's training file: reports two steps, says where it runs (paths only) and which of its environment's
# values hash to what (so the test can look for the secrets without the script ever printing one).
PROBE = """
import hashlib, json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
out = args["output_dir"]
print("PROBE " + json.dumps({"cwd": os.path.realpath(os.getcwd()), "output_dir": os.path.realpath(out)}), flush=True)
digests = sorted(hashlib.sha256(v.encode()).hexdigest() for v in os.environ.values())
print("PROBE-ENV " + json.dumps(digests), flush=True)
for step in (1, 2):
    details = {"step": step, "loss": 1.0 / step}
    print("[log_data]: " + json.dumps({"code": 200, "progress": 50 * step, "details": details}), flush=True)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "result.txt"), "w") as fh:
    fh.write("ok")
"""
# Reached through a symlink out of the methods directory: must never run.
EVIL = """
import pathlib, sys
pathlib.Path(sys.argv[0]).with_name("RAN").write_text("escaped")
"""


class PostgresStack(EmbeddedStack):
    """The embedded stack with both services' databases on PostgreSQL, their URLs carrying a password."""

    def __init__(self, data_dir: Path, catalog_db: str, jobs_db: str) -> None:
        super().__init__(data_dir=data_dir, gateway_port=0)
        self.databases = {"TUNEFORGE_CATALOG_DATABASE_URL": catalog_db, "TUNEFORGE_JOBS_DATABASE_URL": jobs_db}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Any:
        if name != "nats":
            # The chattiest logs to search; a short key cache, so a revocation shows within a second.
            env = {**env, **self.databases, "TUNEFORGE_LOG_LEVEL": "DEBUG", "TUNEFORGE_AUTH_CACHE_SECONDS": "1"}
        return super()._spawn(name, args, env)


def with_password(url: str) -> str:
    return url.replace("://postgres@", f"://postgres:{PG_PASSWORD}@", 1)


def encodings(secret: str) -> set[str]:
    """A secret as it might leak: itself, base64 (plain, URL-safe, as in a Basic header), its part after a
    `tf_<id>_` prefix."""
    forms = {secret}
    parts = secret.split("_")
    if len(parts) == 3 and parts[0] in ("tf", "tfa"):
        forms.add(parts[2])
    for form in list(forms):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(form.encode()).decode().rstrip("="))
        forms.add(base64.b64encode(f"admin:{form}".encode()).decode())
    return forms


async def stream_events(nats_url: str) -> list[bytes]:
    """Every message kept on every stream of the stack's NATS: subject, headers and data."""
    found = []
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(info.config.name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                found.append(f"{msg.subject} {msg.headers}".encode() + b" " + (msg.data or b""))
    finally:
        await nc.close()
    return found


async def database_text(url: str) -> str:
    engine = make_engine(url)
    chunks = []
    async with engine.connect() as conn:
        tables = await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
        for table in list(tables.scalars()):
            chunks += (await conn.execute(text(f'SELECT t::text FROM "{table}" t'))).scalars().all()
    await engine.dispose()
    return "\n".join(chunks)


def wait_for_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = http.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not end in {JOB_TIMEOUT_S}s: {job}")


def test_a_runner_inherits_none_of_the_agents_service_secrets():
    agent_env = {
        "PATH": "/usr/bin",
        "TUNEFORGE_SERVICE_TOKEN": "s",
        "TUNEFORGE_AGENT_JOIN_TOKEN": "j",
        "TUNEFORGE_AGENT_JOIN_TOKENS": "j",
        "TUNEFORGE_BOOTSTRAP_ADMIN_KEY": "a",
        "TUNEFORGE_JOBS_DATABASE_URL": "postgresql://u:pw@h/db",
        "TUNEFORGE_NATS_URL": "nats://u:pw@h:4222",
        "TUNEFORGE_AGENT_CREDENTIAL_FILE": "/var/lib/tuneforge/credential",
        "TUNEFORGE_REWARDS_DIR": "/rewards",  # a runner's own setting: kept
    }
    env, _ = runner_env(agent_env, {"lora_rank": 8}, {"TUNEFORGE_JOB_ID": "job-1"})
    assert {k for k in env if k.startswith("TUNEFORGE_")} == {"TUNEFORGE_REWARDS_DIR", "TUNEFORGE_JOB_ID"}
    assert env["PATH"] == "/usr/bin" and env["LORA_RANK"] == "8"


@pytest.fixture
def stack(tmp_path, postgres_url, second_postgres_url):
    data_dir = tmp_path / "stack"
    methods = data_dir / "methods"
    (methods / "probe").mkdir(parents=True)
    (methods / "probe" / "train.py").write_text(PROBE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text(EVIL)
    (methods / "linked").symlink_to(outside)
    # The method below never loads its model, so a Hugging Face-shaped stand-in replaces the built-in tiny model
    # (building that takes half a minute on a busy CI machine); the stack builds one only when none is there.
    write_fake_model_dir(data_dir / "models" / BUILTIN_MODEL)
    running = PostgresStack(data_dir, with_password(postgres_url), with_password(second_postgres_url))
    try:
        running.start()
        yield running
    finally:
        running.stop(grace=10)


def test_no_secret_reaches_a_log_an_event_a_metric_or_an_error_and_keys_are_stored_hashed(
    stack, tmp_path, postgres_url, second_postgres_url, figures
):
    kept = json.loads((stack.data_dir / "secrets.json").read_text())
    admin = stack.admin_key
    assert admin.startswith("tf_")
    url = stack.gateway_url
    bodies: list[str] = []  # every error body and every listing, searched with the logs

    def as_key(key: str, **extra: str) -> httpx.Client:
        return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}", **extra})

    def note(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400 or resp.request.method == "GET":
            bodies.append(f"{resp.status_code} {dict(resp.headers)} {resp.text}")
        return resp

    with as_key(admin) as root:
        assert note(root.get("/api/v1/whoami")).status_code == 200  # a sign-in
        project = root.post("/api/v1/projects", json={"name": "team"}).json()["id"]
        made = root.post("/api/v1/keys", json={"name": "alice", "roles": {project: "admin"}})
        assert made.status_code == 201, made.text
        user_key = made.json()["secret"]
        temp = root.post("/api/v1/keys", json={"name": "temp", "roles": {project: "viewer"}}).json()
    wrong = user_key[:-1] + ("0" if user_key[-1] != "0" else "1")  # a user's key, wrong in its last character
    with as_key(wrong) as bad, as_key(temp["secret"]) as temporary:
        assert note(bad.get("/api/v1/jobs")).status_code == 401  # a failed sign-in, REST and OpenAI-style
        assert note(bad.get("/v1/models")).status_code == 401
        basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{PG_PASSWORD}".encode()).decode()}
        assert note(httpx.get(f"{url}/api/v1/jobs", headers=basic)).status_code == 401
        assert note(temporary.get("/api/v1/whoami")).status_code == 200
        with as_key(user_key) as alice:
            assert note(alice.delete(f"/api/v1/keys/{temp['id']}")).status_code == 200  # revocation
        time.sleep(1.5)  # past the services' key cache
        assert note(temporary.get("/api/v1/whoami")).status_code == 401

    with as_key(user_key) as alice:
        note(alice.get("/api/v1/keys"))
        files = {"file": ("chat.jsonl", SAMPLE.read_bytes(), "application/jsonl")}
        dataset = alice.post("/api/v1/datasets", files=files, data={"name": "chat"})
        assert dataset.status_code == 201, dataset.text
        model = next(m for m in note(alice.get("/api/v1/models")).json()["models"])["id"]
        for name, file in (("probe", "probe/train.py"), ("escape", "linked/evil.py")):
            stages = {"training": {"file": file, "env": "base"}}
            definition = {"name": name, "training_type": "chat", "lifecycle": "customized", "stages": stages}
            assert alice.post("/api/v1/methods", json=definition).status_code == 201
        jobs = {}
        for method in ("probe", "escape"):
            submitted = alice.post(
                "/api/v1/jobs",
                json={"model_id": model, "dataset_id": dataset.json()["id"], "method_id": method},
            )
            assert submitted.status_code == 201, submitted.text
            jobs[method] = submitted.json()["id"]
        assert note(alice.post("/api/v1/jobs", json={"model_id": "nope", "dataset_id": "nope"})).status_code >= 400
        assert note(alice.get("/api/v1/jobs/job-does-not-exist")).status_code == 404
        probe = wait_for_job(alice, jobs["probe"])
        escape = wait_for_job(alice, jobs["escape"])
        logs = {m: note(alice.get(f"/api/v1/jobs/{j}/logs", params={"page_size": 1000})).text for m, j in jobs.items()}
        for job_id in jobs.values():
            note(alice.get(f"/api/v1/jobs/{job_id}/history"))
        metrics = [httpx.get(f"{url}/metrics").text] + [
            httpx.get(f"http://127.0.0.1:{stack.ports[f'{name}-metrics']}/metrics").text
            for name in ("catalog", "jobs", "trainer")
        ]
        # A backend down: the gateway's and the jobs service's failed calls (exception text, retries) are logged.
        stack.procs["catalog"].terminate()
        stack.procs["catalog"].wait(15)
        for _ in range(3):
            assert note(alice.get("/api/v1/models")).status_code >= 500
            note(alice.post("/api/v1/jobs", json={"model_id": model, "dataset_id": dataset.json()["id"]}))
        metrics.append(httpx.get(f"{url}/metrics").text)  # the gateway's, with the failed calls counted
    assert probe["state"] == "SUCCEEDED", (probe, logs["probe"][-3000:])
    # The symlinked file was never run: the job failed naming why, and the file outside wrote nothing.
    assert escape["state"] == "FAILED" and "outside the methods directory" in escape.get("reason", str(escape))
    assert not (tmp_path / "outside" / "RAN").exists()

    # Inside the runner: its directory and output are the job's own, under the agent's work dir.
    lines = [
        json.loads(x["text"][len("PROBE ") :])
        for x in json.loads(logs["probe"])["lines"]
        if x["text"].startswith("PROBE {")
    ]
    work = str((stack.data_dir / "agent" / jobs["probe"]).resolve())
    assert lines and lines[0]["cwd"].startswith(work + "/") and lines[0]["output_dir"].startswith(work + "/"), lines
    env_digests = next(
        json.loads(x["text"][len("PROBE-ENV ") :])
        for x in json.loads(logs["probe"])["lines"]
        if x["text"].startswith("PROBE-ENV ")
    )

    # Wait for the outbox to publish the jobs' last events, then read every stream.
    nats_url = f"nats://127.0.0.1:{stack.ports['nats']}"
    events: list[bytes] = []
    for _ in range(40):
        events = asyncio.run(stream_events(nats_url))
        if sum(jobs["probe"].encode() in e and b"SUCCEEDED" in e.upper() for e in events):
            break
        time.sleep(0.5)
    log_files = [p for p in stack.data_dir.rglob("*.log")]
    searched: dict[str, bytes] = {str(p): p.read_bytes() for p in log_files}
    searched |= {f"event {i}": e for i, e in enumerate(events)}
    searched |= {f"metrics {i}": m.encode() for i, m in enumerate(metrics)}
    searched |= {f"body {i}": b.encode() for i, b in enumerate(bodies)}
    searched |= {f"job log {m}": t.encode() for m, t in logs.items()}
    databases = {"catalog db": postgres_url, "jobs db": second_postgres_url}
    searched |= {name: asyncio.run(database_text(db)).encode() for name, db in databases.items()}
    assert len(log_files) >= 4 and events and all(metrics)

    agent_credential = (stack.data_dir / "agent" / "credential").read_text().strip()
    secrets = {
        "bootstrap admin key": admin,
        "service token": kept["service_token"],
        "agent join token": kept["agent_join_token"],
        "agent credential": agent_credential,
        "created API key": user_key,
        "revoked API key": temp["secret"],
        "API key wrong in its last character": wrong,
        "database password": PG_PASSWORD,
    }
    hits = [
        (what, form[:12], where)
        for what, secret in secrets.items()
        for form in encodings(secret)
        for where, content in searched.items()
        if form.encode() in content
    ]
    assert hits == [], hits
    # What the key table holds instead: sha256 of each key's secret part.
    for key in (admin, user_key, temp["secret"]):
        assert hash_secret(key.split("_")[2]).encode() in searched["catalog db"]
    # The runner's environment held none of them (compared by hash: the probe never printed a value).
    leaked_to_runner = [what for what, s in secrets.items() if hashlib.sha256(s.encode()).hexdigest() in env_digests]
    assert hashlib.sha256(jobs["probe"].encode()).hexdigest() in env_digests  # the probe sees TUNEFORGE_JOB_ID
    assert leaked_to_runner == []
    figures.record("secrets searched (each in 4+ encodings)", len(secrets), "secrets")
    figures.record("bytes of logs, events, metrics, bodies and DB rows searched", sum(map(len, searched.values())), "B")
    figures.record("NATS events searched", len(events), "events")
    figures.record("secret occurrences found", len(hits), "occurrences", goal="0")
