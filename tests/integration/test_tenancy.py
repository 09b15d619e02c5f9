"""API keys, roles and projects across the real catalog, jobs service and gateway (PostgreSQL, auth on as
main() wires it): a second project tries every route on the first one's objects and gets nothing; keys
are hashed, shown once and revocable; roles limit what a key does; agents speak only for themselves."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from sqlalchemy import select

from tests.helpers import chat_jsonl, write_fake_model_dir
from tests.stack import SEED_MODEL_ID, Services, catalog_and_jobs
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_catalog import store as catalog_store
from tuneforge_common.auth import call_credentials, credentials_metadata, new_key
from tuneforge_common.db import make_engine
from tuneforge_gateway.app import create_app

SERVICE_TOKEN = secrets.token_hex(16)
JOIN_TOKEN = secrets.token_hex(16)


@dataclass
class Tenancy:
    services: Services
    http: httpx.AsyncClient
    admin: str
    catalog_url: str
    tmp_path: Path

    def as_key(self, key: str, project: str = "") -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", **({"X-TuneForge-Project": project} if project else {})}

    async def call(self, method: str, url: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = {**(self.as_key(key) if key else {}), **kwargs.pop("headers", {})}
        return await self.http.request(method, url, headers=headers, **kwargs)

    async def new_key(self, name: str, roles: dict[str, str]) -> str:
        resp = await self.call("POST", "/api/v1/keys", self.admin, json={"name": name, "roles": roles})
        assert resp.status_code == 201, resp.text
        return resp.json()["secret"]


@pytest.fixture
async def tenancy(postgres_url, second_postgres_url, tmp_path) -> AsyncIterator[Tenancy]:
    admin = new_key()[1]
    async with catalog_and_jobs(
        postgres_url,
        second_postgres_url,
        tmp_path,
        service_token=SERVICE_TOKEN,
        admin_key=admin,
        join_tokens=(JOIN_TOKEN,),
    ) as services:
        app = create_app(
            services.catalog_address,
            services.jobs_address,
            upload_dir=tmp_path / "uploads",
            service_token=SERVICE_TOKEN,
        )
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield Tenancy(services, c, admin, postgres_url, tmp_path)


@dataclass
class Owned:
    """What project alpha made; beta tries every route on it."""

    key: str
    project: str
    model_id: str
    dataset_id: str
    job_id: str
    upload_id: str
    method_id: str
    key_id: str
    deployment_id: str


async def alpha_with_objects(t: Tenancy) -> Owned:
    project = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "alpha"})).json()["id"]
    key = await t.new_key("alice", {project: "admin"})
    model_dir = write_fake_model_dir(t.tmp_path / "alpha-model")
    model = await t.call("POST", "/api/v1/models", key, json={"path": str(model_dir), "name": "alpha-model"})
    assert model.status_code == 201, model.text
    files = {"file": ("a.jsonl", chat_jsonl(4), "application/jsonl")}
    dataset = await t.call("POST", "/api/v1/datasets", key, files=files, data={"name": "alpha-data"})
    assert dataset.status_code == 201, dataset.text
    job = await t.call(
        "POST",
        "/api/v1/jobs",
        key,
        json={"model_id": model.json()["id"], "dataset_id": dataset.json()["id"], "method_id": "sft-lora"},
    )
    assert job.status_code == 201, job.text
    upload = await t.call("POST", "/api/v1/uploads", key, json={"name": "half", "size": 10})
    method = await t.call(
        "POST",
        "/api/v1/methods",
        key,
        json={
            "name": "alpha-sft",
            "training_type": "chat",
            "lifecycle": "customized",
            "stages": {"training": {"file": "alpha/train.py", "env": "base"}},
        },
    )
    assert method.status_code == 201, method.text
    whoami = (await t.call("GET", "/api/v1/whoami", key)).json()
    deployment = await t.call("POST", f"/api/v1/models/{model.json()['id']}/deploy", key, json={})
    assert deployment.status_code == 201, deployment.text
    return Owned(
        key,
        project,
        model.json()["id"],
        dataset.json()["id"],
        job.json()["id"],
        upload.json()["upload_id"],
        "alpha-sft",
        whoami["key"]["id"],
        deployment.json()["id"],
    )


def fill(path: str, owned: Owned) -> str:
    ids = {
        "model_id": owned.model_id,
        "dataset_id": owned.dataset_id,
        "job_id": owned.job_id,
        "upload_id": owned.upload_id,
        "method_id": owned.method_id,
        "file_id": owned.dataset_id,
        "key_id": owned.key_id,
        "deployment_id": owned.deployment_id,
    }
    for name, value in ids.items():
        path = path.replace(f"{{{name}}}", value).replace(f"{{{name}:path}}", value)
    return path


# Bodies that pass the gateway's own validation, so the refusal shown is the backend's, not a 400.
BODIES: dict[tuple[str, str], Any] = {
    ("PATCH", "/api/v1/models/{model_id}"): {"json": {"description": "mine now"}},
    ("POST", "/api/v1/datasets/{dataset_id}/split"): {"json": {"validation_ratio": 0.25}},
    ("POST", "/api/v1/jobs/{job_id}/copy"): {"json": {}},
    ("POST", "/api/v1/jobs/{job_id}/publish"): {"json": {"step": 0, "name": "stolen"}},
    ("POST", "/api/v1/models/{model_id}/evaluate"): {"json": {"dataset_id": "any"}},
    ("PUT", "/api/v1/uploads/{upload_id}"): {"content": b"0123456789", "headers": {"Content-Range": "bytes 0-9/10"}},
}


def routes_on_objects(app: Any) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document that names an object, but the SSE stream (tried apart)."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        if "{" not in path or path == "/api/v1/jobs/{job_id}/events":
            continue
        found += [(method.upper(), path) for method in operations if method != "head"]
    return found


async def test_another_project_gets_not_found_on_every_route_over_the_first_ones_objects(tenancy):
    t = tenancy
    owned = await alpha_with_objects(t)
    beta = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "beta"})).json()["id"]
    bob = await t.new_key("bob", {beta: "admin"})
    routes = routes_on_objects(t.http._transport.app)  # type: ignore[attr-defined]
    # Every catalog, jobs, upload, key and OpenAI route with an object id (27 when this was written).
    assert len(routes) >= 27 and ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints") in routes, routes
    for method, path in routes:
        kwargs = BODIES.get((method, path), {})
        resp = await t.call(method, fill(path, owned), bob, **kwargs)
        assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
        # Only the id asked for comes back (in "... not found"); nothing of the object itself.
        assert owned.project not in resp.text and "alpha-model" not in resp.text and "alpha-data" not in resp.text
    compare = await t.call("GET", "/api/v1/jobs/compare", bob, params={"job_id": [owned.job_id, owned.job_id + "x"]})
    assert compare.status_code == 404
    events = await t.call("GET", f"/api/v1/jobs/{owned.job_id}/events", bob)
    assert events.status_code == 404
    # Lists show bob's project only (the shared built-ins, nothing of alpha's).
    for url, items in (
        ("/api/v1/models", "models"),
        ("/api/v1/datasets", "datasets"),
        ("/api/v1/jobs", "jobs"),
        ("/api/v1/methods", "methods"),
        ("/api/v1/keys", "keys"),
        ("/api/v1/projects", "projects"),
        ("/api/v1/deployments", "deployments"),
        ("/v1/files", "data"),
        ("/v1/fine_tuning/jobs", "data"),
        ("/v1/models", "data"),
    ):
        listed = await t.call("GET", url, bob)
        assert listed.status_code == 200, (url, listed.text)
        assert owned.project not in listed.text and "alpha-" not in listed.text, url
        for item in listed.json()[items]:
            assert item.get("project_id", "") in ("", beta) and item.get("id") not in (owned.job_id, owned.model_id)
    # Naming alpha's project outright is as unknown as any other name.
    probe = await t.http.get("/api/v1/models", headers=t.as_key(bob, owned.project))
    assert probe.status_code == 404 and probe.json()["error"]["message"] == f"project {owned.project!r} not found"
    # Alpha's objects are untouched.
    job = await t.call("GET", f"/api/v1/jobs/{owned.job_id}", owned.key)
    assert job.json()["state"] == "QUEUED"
    assert (await t.call("GET", f"/api/v1/models/{owned.model_id}", owned.key)).json()["description"] == ""


async def test_projects_name_their_methods_independently_and_never_learn_of_each_others(tenancy):
    t = tenancy
    owned = await alpha_with_objects(t)
    beta = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "beta"})).json()["id"]
    bob = await t.new_key("bob", {beta: "admin"})

    def definition(training_file: str) -> dict[str, Any]:
        stages = {"training": {"file": training_file, "env": "base"}}
        return {"name": owned.method_id, "training_type": "chat", "lifecycle": "customized", "stages": stages}

    # Alpha holds "alpha-sft"; beta adds its own of that name as if alpha's did not exist.
    created = await t.call("POST", "/api/v1/methods", bob, json=definition("beta/train.py"))
    assert created.status_code == 201, created.text
    assert created.json()["id"] == owned.method_id and created.json()["project_id"] == beta
    again = await t.call("POST", "/api/v1/methods", bob, json=definition("beta/other.py"))
    assert again.status_code == 409  # its own name is taken
    builtin = await t.call("POST", "/api/v1/methods", bob, json={**definition("x.py"), "name": "sft-lora"})
    assert builtin.status_code == 400 and builtin.json()["error"]["field"] == "definition.name"  # built-ins' names
    for key, entrypoint in ((owned.key, "alpha/train.py"), (bob, "beta/train.py")):
        got = (await t.call("GET", f"/api/v1/methods/{owned.method_id}", key)).json()
        assert got["entrypoint"] == entrypoint
    # Deleting beta's leaves alpha's, and alpha's name stays taken for alpha only.
    assert (await t.call("DELETE", f"/api/v1/methods/{owned.method_id}", bob)).status_code == 204
    assert (await t.call("GET", f"/api/v1/methods/{owned.method_id}", bob)).status_code == 404
    assert (await t.call("GET", f"/api/v1/methods/{owned.method_id}", owned.key)).status_code == 200
    listed = (await t.call("GET", "/api/v1/methods", owned.key)).json()["methods"]
    assert [m["id"] for m in listed if not m["builtin"]] == [owned.method_id]


async def test_every_route_without_a_key_or_with_a_revoked_or_malformed_one_is_401(tenancy):
    t = tenancy
    owned = await alpha_with_objects(t)
    revoked = await t.new_key("leaver", {owned.project: "member"})
    leaver_id = (await t.call("GET", "/api/v1/whoami", revoked)).json()["key"]["id"]
    assert (await t.call("DELETE", f"/api/v1/keys/{leaver_id}", owned.key)).json()["revoke_time"]
    routes = routes_on_objects(t.http._transport.app) + [  # type: ignore[attr-defined]
        ("GET", "/api/v1/models"),
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("GET", "/api/v1/whoami"),
    ]
    for key in (None, revoked, "tf_0123_notakey", "Basic abc"):
        for method, path in routes:
            resp = await t.call(method, fill(path, owned), key, **BODIES.get((method, path), {}))
            assert resp.status_code in (401, 400) if method in ("POST", "PUT", "PATCH") else 401, (key, path)
            if resp.status_code == 401:
                assert resp.json()["error"]["code"].upper() == "UNAUTHENTICATED"  # /v1 is lower case, as OpenAI
    health = await t.http.get("/healthz")
    assert health.status_code == 200


async def test_a_key_is_shown_once_stored_hashed_and_its_roles_limit_it(tenancy):
    t = tenancy
    owned = await alpha_with_objects(t)
    created = await t.call(
        "POST", "/api/v1/keys", owned.key, json={"name": "viewer", "roles": {owned.project: "viewer"}}
    )
    body = created.json()
    viewer, key_id = body["secret"], body["id"]
    assert viewer.startswith(f"tf_{key_id}_") and body["roles"] == [{"project_id": owned.project, "role": "viewer"}]
    listed = (await t.call("GET", "/api/v1/keys", owned.key)).json()["keys"]
    assert viewer not in str(listed) and key_id in str(listed)
    engine = make_engine(t.catalog_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(catalog_store.api_keys))).all()
    await engine.dispose()
    assert all(viewer.split("_")[2] not in str(tuple(r)) for r in rows)  # only a hash of the secret is stored
    # A viewer reads but changes nothing.
    assert (await t.call("GET", f"/api/v1/jobs/{owned.job_id}", viewer)).status_code == 200
    for method, path, kwargs in (
        ("POST", f"/api/v1/jobs/{owned.job_id}/cancel", {}),
        ("DELETE", f"/api/v1/datasets/{owned.dataset_id}", {}),
        ("POST", "/api/v1/jobs", {"json": {"model_id": owned.model_id, "dataset_id": owned.dataset_id}}),
        ("PATCH", f"/api/v1/models/{owned.model_id}", {"json": {"description": "x"}}),
    ):
        resp = await t.call(method, path, viewer, **kwargs)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "PERMISSION_DENIED", (path, resp.text)
    # A member trains but does not add or delete methods (seed 003: admins only), nor mint keys.
    member = await t.new_key("member", {owned.project: "member"})
    stages = {"training": {"file": "a.py", "env": "base"}}
    definition = {"name": "m2", "training_type": "chat", "lifecycle": "customized", "stages": stages}
    assert (await t.call("POST", "/api/v1/methods", member, json=definition)).status_code == 403
    assert (await t.call("DELETE", f"/api/v1/methods/{owned.method_id}", member)).status_code == 403
    mint = await t.call("POST", "/api/v1/keys", member, json={"name": "x", "roles": {owned.project: "viewer"}})
    assert mint.status_code == 403
    # Project admins can't make superusers; built-in objects are shared and only a superuser changes them.
    superuser = await t.call("POST", "/api/v1/keys", owned.key, json={"name": "s", "superuser": True})
    assert superuser.status_code == 403
    builtin = await t.call("PATCH", f"/api/v1/models/{SEED_MODEL_ID}", owned.key, json={"description": "x"})
    assert builtin.status_code == 403
    # Revocation works at once (the test stack caches no key).
    assert (await t.call("DELETE", f"/api/v1/keys/{key_id}", owned.key)).status_code == 200
    assert (await t.call("GET", f"/api/v1/jobs/{owned.job_id}", viewer)).status_code == 401


async def test_the_openai_client_sees_only_its_projects_objects(tenancy):
    openai = pytest.importorskip("openai")
    t = tenancy
    owned = await alpha_with_objects(t)
    beta = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "beta"})).json()["id"]
    bob = await t.new_key("bob", {beta: "member"})
    client = openai.AsyncOpenAI(api_key=bob, base_url="http://gw/v1", http_client=t.http)
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve(owned.job_id)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(owned.dataset_id)
    with pytest.raises(openai.NotFoundError) as chat:  # alpha's deployed model is no model at all to bob
        await client.chat.completions.create(model=owned.model_id, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.code == "model_not_found"
    assert [j.id for j in (await client.fine_tuning.jobs.list()).data] == []
    alice = openai.AsyncOpenAI(api_key=owned.key, base_url="http://gw/v1", http_client=t.http)
    assert (await alice.fine_tuning.jobs.retrieve(owned.job_id)).id == owned.job_id
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(api_key="tf_x_y", base_url="http://gw/v1", http_client=t.http).models.list()


async def test_openai_files_page_through_the_projects_own_and_never_after_anothers(tenancy):
    openai = pytest.importorskip("openai")
    t = tenancy
    owned = await alpha_with_objects(t)
    beta = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "beta"})).json()["id"]
    bob = openai.AsyncOpenAI(
        api_key=await t.new_key("bob", {beta: "member"}), base_url="http://gw/v1", http_client=t.http
    )
    uploaded = [
        (await bob.files.create(file=(f"b{i}.jsonl", chat_jsonl(2 + i)), purpose="fine-tune")).id for i in range(3)
    ]
    newest_first = [f.id for f in (await bob.files.list()).data]
    assert sorted(newest_first) == sorted(uploaded) and owned.dataset_id not in newest_first
    assert [f.id async for f in bob.files.list(limit=1)] == newest_first  # after each last id, one at a time
    assert [f.id async for f in bob.files.list(limit=2, order="asc")] == newest_first[::-1]
    page = await bob.files.list(after=newest_first[0], limit=1)
    assert [f.id for f in page.data] == [newest_first[1]] and page.has_more
    # Alpha's file is no cursor for beta: as unknown as a made-up id, and nothing of it is told.
    with pytest.raises(openai.BadRequestError) as refused:
        await bob.files.list(after=owned.dataset_id)
    assert (refused.value.param, refused.value.code) == ("after", "invalid_cursor")
    assert refused.value.body["message"] == f"no item with id {owned.dataset_id!r} in this list"
    alice = openai.AsyncOpenAI(api_key=owned.key, base_url="http://gw/v1", http_client=t.http)
    assert [f.id for f in (await alice.files.list(after=owned.dataset_id)).data] == []


def agent_stub(t: Tenancy, credential: str) -> tuple[grpc.aio.Channel, agent_pb2_grpc.AgentServiceStub]:
    creds = call_credentials(lambda: credentials_metadata(credential))
    channel = grpc.aio.insecure_channel(t.services.jobs_address, interceptors=creds)
    return channel, agent_pb2_grpc.AgentServiceStub(channel)


async def test_agents_join_with_a_token_and_report_only_on_their_own_jobs(tenancy):
    t = tenancy
    owned = await alpha_with_objects(t)
    open_channel = grpc.aio.insecure_channel(t.services.jobs_address)
    anonymous = agent_pb2_grpc.AgentServiceStub(open_channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anonymous.JoinAgent(apb.JoinAgentRequest(join_token="guess", name="intruder"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anonymous.RegisterAgent(apb.RegisterAgentRequest(name="no-credential"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    a_cred = (await anonymous.JoinAgent(apb.JoinAgentRequest(join_token=JOIN_TOKEN, name="node-a"))).credential
    b_cred = (await anonymous.JoinAgent(apb.JoinAgentRequest(join_token=JOIN_TOKEN, name="node-b"))).credential
    a_channel, a = agent_stub(t, a_cred)
    b_channel, b = agent_stub(t, b_cred)
    user_channel, as_user = agent_stub(t, owned.key)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await as_user.RegisterAgent(apb.RegisterAgentRequest(name="user-pretending"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        resources = apb.AgentResources(cpu_count=1, memory_bytes=1 << 30, slots=1)
        a_id = (await a.RegisterAgent(apb.RegisterAgentRequest(name="node-a", resources=resources))).agent_id
        b_id = (await b.RegisterAgent(apb.RegisterAgentRequest(name="node-b", resources=resources))).agent_id
        stream = a.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=a_id))
        assignment = (await stream.read()).assignment
        stream.cancel()
        assert assignment.job_id == owned.job_id
        # B can't speak for A: not heartbeat, not stream its work, not report as it.
        for call in (
            b.Heartbeat(apb.HeartbeatRequest(agent_id=a_id)),
            b.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=a_id)).read(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        as_a = apb.ReportJobRequest(job_id=owned.job_id, attempt=assignment.attempt, seq=1, agent_id=a_id)
        as_a.log.text = "forged"
        reports = b.ReportJob()
        await reports.write(as_a)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reports.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Reporting under its own id on A's job is fenced: B is told to stop and nothing is stored.
        as_b = apb.ReportJobRequest(job_id=owned.job_id, attempt=assignment.attempt, seq=1, agent_id=b_id)
        as_b.log.text = "forged"
        reports = b.ReportJob()
        await reports.write(as_b)
        answer = await reports.read()
        assert answer.stop and "no longer runs on agent" in answer.reason
        await reports.done_writing()
        jobs = jobs_pb2_grpc.JobServiceStub(user_channel)
        logs = await jobs.ListJobLogs(jpb.ListJobLogsRequest(job_id=owned.job_id))
        assert [line.text for line in logs.lines if "forged" in line.text] == []
        # Agents read no user data through the user API.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await jobs_pb2_grpc.JobServiceStub(a_channel).GetJob(jpb.GetJobRequest(job_id=owned.job_id))
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    finally:
        for channel in (open_channel, a_channel, b_channel, user_channel):
            await channel.close()
