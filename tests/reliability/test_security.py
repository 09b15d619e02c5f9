"""Auth and containment, enumerated from the product itself so a new route or RPC can't slip past unchecked.

REST: every route of the gateway's app (its OpenAPI document plus the routes kept out of it) is either on a
named public allow-list or refuses every wrong credential, and a refused write changes nothing in either
database. gRPC: every method of every service in the generated descriptors refuses a missing or revoked key,
and user keys and agent credentials stay on their own side. Agents report only on their own assignments, and a
custom method's files can't name anything outside the methods directory. test_tenancy.py has the first checks
of each (another project's key on object routes, agents speaking for each other); this extends them rather
than repeating them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import text

from tests.helpers import chat_jsonl
from tests.integration.test_tenancy import (  # noqa: F401  (tenancy is a fixture used by name)
    BODIES,
    JOIN_TOKEN,
    Owned,
    Tenancy,
    agent_stub,
    alpha_with_objects,
    fill,
    tenancy,
)
from tuneforge.agent.v1 import agent_pb2, agent_pb2_grpc
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.auth.v1 import auth_pb2
from tuneforge.catalog.v1 import catalog_pb2
from tuneforge.common.v1 import common_pb2
from tuneforge.jobs.v1 import inference_pb2, jobs_pb2, lifecycle_pb2
from tuneforge_common.auth import credentials_metadata
from tuneforge_common.db import make_engine

# Routes anyone may call: the probe, the API's own description, the dashboard's shell and its static files
# (the dashboard asks for a key before it calls the API), and Prometheus' scrape (counters only; the secrets
# test reads it for leaks). Everything else needs a key.
PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
        ("GET", "/"),
        ("GET", "/ui/assets/{path}"),
    }
)
WRITES = ("POST", "PUT", "PATCH", "DELETE")
# Writes by verb only: a chat completion reads a deployed model, and a viewer may chat (model_lifecycle.py).
VIEWER_MAY = frozenset({("POST", "/v1/chat/completions")})


def gateway_routes(app: Any) -> list[tuple[str, str]]:
    """Every (method, path) the gateway serves: its OpenAPI operations, then the routes and mounts kept out of
    the document (found by walking the router, included routers too)."""
    found = [(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops]

    def walk(routes: list[Any]) -> Iterator[tuple[str, str]]:
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI's wrapper for an included router
                yield from walk(route.original_router.routes)
            elif hasattr(route, "app") and not hasattr(route, "methods"):  # a Mount: one probe path inside
                yield "GET", route.path + "/{path}"
            elif not getattr(route, "include_in_schema", True):
                yield from ((m, route.path) for m in route.methods)

    for method, path in walk(app.routes):
        if (method, path) not in found and method != "HEAD":
            found.append((method, path))
    return found


def body_for(method: str, path: str, t: Tenancy, owned: Owned) -> dict[str, Any]:
    """A request that passes the gateway's own validation, so the status seen is the credential's verdict."""
    if (method, path) in BODIES:
        return BODIES[(method, path)]
    dataset = {"files": {"file": ("s.jsonl", chat_jsonl(2), "application/jsonl")}}
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", "/api/v1/models"): {"json": {"path": str(t.tmp_path / "alpha-model"), "name": "sneaked"}},
        ("POST", "/api/v1/datasets"): {**dataset, "data": {"name": "sneaked"}},
        ("POST", "/v1/files"): {**dataset, "data": {"purpose": "fine-tune"}},
        ("POST", "/api/v1/uploads"): {"json": {"name": "sneaked", "size": 10}},
        ("POST", "/api/v1/jobs"): {
            "json": {"model_id": owned.model_id, "dataset_id": owned.dataset_id, "method_id": "sft-lora"}
        },
        ("POST", "/v1/fine_tuning/jobs"): {"json": {"model": owned.model_id, "training_file": owned.dataset_id}},
        ("POST", "/api/v1/methods"): {
            "json": {
                "name": "sneaked",
                "training_type": "chat",
                "lifecycle": "customized",
                "stages": {"training": {"file": "s/train.py", "env": "base"}},
            }
        },
        ("POST", "/api/v1/projects"): {"json": {"name": "sneaked"}},
        ("POST", "/api/v1/keys"): {"json": {"name": "sneaked", "roles": {owned.project: "admin"}}},
        ("POST", "/v1/chat/completions"): {
            "json": {"model": owned.model_id, "messages": [{"role": "user", "content": "hi"}]}
        },
        ("POST", "/api/v1/models/{model_id}/deploy"): {"json": {}},
        ("POST", "/api/v1/models/{model_id}/merge"): {"json": {}},
        ("GET", "/api/v1/jobs/compare"): {"params": {"job_id": [owned.job_id, owned.job_id]}},
    }
    return bodies.get((method, path), {})


async def database_state(urls: tuple[str, ...]) -> dict[str, str]:
    """A digest of every table of both services' databases: equal before and after means nothing was written."""
    digests: dict[str, str] = {}
    for url in urls:
        engine = make_engine(url)
        async with engine.connect() as conn:
            tables = (
                await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
            ).scalars()
            for table in list(tables):
                rows = (await conn.execute(text(f'SELECT t::text FROM "{table}" t'))).scalars().all()
                digests[f"{url}/{table}"] = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()
        await engine.dispose()
    return digests


def files_under(*roots: Path) -> set[str]:
    return {str(Path(d) / f) for root in roots if root.exists() for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
async def secured(tenancy, postgres_url, second_postgres_url) -> tuple[Tenancy, Owned, tuple[str, ...]]:  # noqa: F811
    """test_tenancy's stack (catalog, jobs, gateway; keys checked as main() wires them), project alpha's
    objects, and the two services' database URLs."""
    return tenancy, await alpha_with_objects(tenancy), (postgres_url, second_postgres_url)


async def test_the_only_routes_answering_without_a_key_are_the_named_public_ones(secured, figures):
    t, owned, databases = secured
    routes = gateway_routes(t.http._transport.app)  # type: ignore[attr-defined]
    answered = set()
    for method, path in routes:
        url = fill(path, owned).replace("{path}", "app.js")
        resp = await t.http.request(method, url, **body_for(method, path, t, owned))
        if resp.status_code != 401:
            answered.add((method, path))
    # Exactly the allow-list: a route missing from it means it lost its check; one extra, a stale list.
    assert answered == PUBLIC_ROUTES, (answered - PUBLIC_ROUTES, PUBLIC_ROUTES - answered)
    figures.record("REST routes enumerated", len(routes), "routes")
    figures.record("REST routes public (allow-listed)", len(PUBLIC_ROUTES), "routes")


async def test_every_protected_route_refuses_each_wrong_credential_and_writes_nothing(secured, figures):
    t, owned, databases = secured
    revoked = await t.new_key("leaver", {owned.project: "admin"})
    leaver_id = (await t.call("GET", "/api/v1/whoami", revoked)).json()["key"]["id"]
    assert (await t.call("DELETE", f"/api/v1/keys/{leaver_id}", owned.key)).status_code == 200
    viewer = await t.new_key("viewer", {owned.project: "viewer"})
    beta = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "beta"})).json()["id"]
    bob = await t.new_key("bob", {beta: "admin"})
    routes = [r for r in gateway_routes(t.http._transport.app) if r not in PUBLIC_ROUTES]  # type: ignore[attr-defined]
    before = await database_state(databases)
    assert len(before) >= 10  # both services' tables, so the comparison below can see a write
    uploads_before = files_under(t.tmp_path / "uploads", t.tmp_path / "artifacts")
    checks = 0
    for method, path in routes:
        url = fill(path, owned)
        kwargs = body_for(method, path, t, owned)
        # A missing, malformed (wrong scheme, not a key, a real key wrong in its last character) or revoked key.
        wrong = [{}, {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"Authorization": "Bearer tf_0123_notakey"}]
        wrong += [t.as_key(owned.key[:-1] + ("0" if owned.key[-1] != "0" else "1")), t.as_key(revoked)]
        for headers in wrong:
            resp = await t.http.request(method, url, headers={**headers, **kwargs.get("headers", {})}, **_no_h(kwargs))
            checks += 1
            assert resp.status_code == 401, (method, path, headers, resp.status_code, resp.text)
            if method != "HEAD":  # a HEAD answer has no body
                assert resp.json()["error"]["code"].upper() == "UNAUTHENTICATED"
        # Bob naming alpha's project outright: as unknown as a project that does not exist, on every route.
        resp = await t.http.request(
            method, url, headers={**t.as_key(bob, owned.project), **kwargs.get("headers", {})}, **_no_h(kwargs)
        )
        checks += 1
        assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
        assert "alpha" not in resp.text
        # A key may revoke itself (tried apart below).
        if method in WRITES and (method, path) not in VIEWER_MAY and path != "/api/v1/keys/{key_id}":
            resp = await t.http.request(
                method, url, headers={**t.as_key(viewer), **kwargs.get("headers", {})}, **_no_h(kwargs)
            )
            checks += 1
            # An upload in progress belongs to the key that began it: to any other key it does not exist.
            allowed = (403, 404) if path.startswith("/api/v1/uploads/{upload_id}") else (403,)
            assert resp.status_code in allowed, (method, path, resp.status_code, resp.text)
    assert await database_state(databases) == before
    assert files_under(t.tmp_path / "uploads", t.tmp_path / "artifacts") == uploads_before
    # A viewer revoking another's key is refused too (its own, it may: that is how a leaked key is killed).
    alice_id = (await t.call("GET", "/api/v1/whoami", owned.key)).json()["key"]["id"]
    assert (await t.call("DELETE", f"/api/v1/keys/{alice_id}", viewer)).status_code in (403, 404)
    assert (await t.call("GET", "/api/v1/whoami", owned.key)).status_code == 200
    figures.record("REST protected routes x wrong credentials checked", checks, "requests", goal="all refused")


def _no_h(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "headers"}


# -- gRPC ---------------------------------------------------------------------------------------------------

PROTO_MODULES = (agent_pb2, auth_pb2, catalog_pb2, common_pb2, inference_pb2, jobs_pb2, lifecycle_pb2)
# Agent-side RPCs: an agent credential's, never a user key's. JoinAgent is how an agent gets one (public).
AGENT_SERVICE = "tuneforge.agent.v1.AgentService"
# Open by design (auth.PUBLIC_METHODS): probes and generic clients' reflection carry no credential.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def rpc_methods() -> list[Any]:
    """Every method of every TuneForge service, from the generated descriptors."""
    return [m for mod in PROTO_MODULES for s in mod.DESCRIPTOR.services_by_name.values() for m in s.methods]


async def served_services(address: str) -> set[str]:
    """The services a server offers, as reflection lists them to a generic client (no credential)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for answer in call:
            return {s.name for s in answer.list_services_response.service}
    return set()


async def call_rpc(address: str, method: Any, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    """Call `method` with an empty request (one, for a request stream) and `metadata`; its status code."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    shape = (
        ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
    )
    async with grpc.aio.insecure_channel(address) as channel:
        multicallable = getattr(channel, shape)(
            path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString
        )
        request = iter([request_class()]) if method.client_streaming else request_class()
        try:
            call = multicallable(request, metadata=metadata, timeout=10)
            if method.server_streaming:
                async for _ in call:
                    break
            else:
                await call
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_every_rpc_refuses_wrong_credentials_and_agents_and_users_keep_to_their_own_side(secured, figures):
    t, owned, databases = secured
    joined = await join_agent(t.services.jobs_address, "node-a")
    revoked = await t.new_key("leaver", {owned.project: "admin"})
    leaver_id = (await t.call("GET", "/api/v1/whoami", revoked)).json()["key"]["id"]
    assert (await t.call("DELETE", f"/api/v1/keys/{leaver_id}", owned.key)).status_code == 200
    forged_agent = "_".join(joined.split("_")[:2] + ["0" * 40])  # a real agent's id, a made-up secret
    # A node's credential revoked as an operator does (there is no API for it: the row's revoked_at).
    revoked_agent = await join_agent(t.services.jobs_address, "node-gone")
    engine = make_engine(databases[1])
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE agent_credentials SET revoked_at = now() WHERE id = :id"), {"id": revoked_agent.split("_")[1]}
        )
    await engine.dispose()
    server_of: dict[str, str] = {}
    for address in (t.services.catalog_address, t.services.jobs_address):
        server_of |= dict.fromkeys(await served_services(address), address)
    methods = rpc_methods()
    # Every service in the protos is served somewhere, so nothing below is skipped for want of a server.
    assert {m.containing_service.full_name for m in methods} <= set(server_of), server_of
    before = await database_state(databases)
    checks = 0
    for method in methods:
        address = server_of[method.containing_service.full_name]
        on_agent_side = method.containing_service.full_name == AGENT_SERVICE
        # No key, a revoked key, an agent credential revoked or with a forged secret, the join token as a key.
        for credential in ("", revoked, revoked_agent, forged_agent, JOIN_TOKEN):
            code = await call_rpc(address, method, credentials_metadata(credential))
            checks += 1
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method.full_name, credential[:6], code)
        if method.name == "JoinAgent":  # public: it checks the join token in the request, absent here
            continue
        # A user's key on the agents' side; an agent's credential on the users' side. The catalog knows no
        # agent credentials at all (agents talk to the jobs service only), so there it is unauthenticated.
        if on_agent_side:
            wrong_side, expected = owned.key, grpc.StatusCode.PERMISSION_DENIED
        elif address == t.services.jobs_address:
            wrong_side, expected = joined, grpc.StatusCode.PERMISSION_DENIED
        else:
            wrong_side, expected = joined, grpc.StatusCode.UNAUTHENTICATED
        code = await call_rpc(address, method, credentials_metadata(wrong_side))
        checks += 1
        assert code == expected, (method.full_name, code)
    assert await database_state(databases) == before
    # Probes and reflection stay open by design, on both servers.
    for address in (t.services.catalog_address, t.services.jobs_address):
        async with grpc.aio.insecure_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert set(OPEN_SERVICES) <= await served_services(address)
    figures.record("gRPC methods enumerated", len(methods), "methods")
    figures.record("gRPC method x credential checks", checks, "calls", goal="all refused")


async def join_agent(jobs_address: str, name: str) -> str:
    async with grpc.aio.insecure_channel(jobs_address) as channel:
        request = apb.JoinAgentRequest(join_token=JOIN_TOKEN, name=name)
        return (await agent_pb2_grpc.AgentServiceStub(channel).JoinAgent(request)).credential


# -- agents report only on their own assignments ----------------------------------------------------------


def forged_reports(job_id: str, attempt: int, agent_id: str, uri: str) -> list[apb.ReportJobRequest]:
    """One report of each kind an agent sends, all claiming `job_id`."""
    reports = []
    for seq, kind in enumerate(("state", "metric", "log", "checkpoint"), start=1):
        r = apb.ReportJobRequest(job_id=job_id, attempt=attempt, seq=seq, agent_id=agent_id, time_unix=1.0)
        if kind == "state":
            r.state.state = apb.REPORTED_STATE_SUCCEEDED
            r.state.output_uri = uri
        elif kind == "metric":
            r.metric.step = 7
            r.metric.values["loss"] = 0.123
        elif kind == "log":
            r.log.text = "forged line"
        else:
            r.checkpoint.step = 7
            r.checkpoint.uri = uri
        reports.append(r)
    return reports


async def send_report(stub: agent_pb2_grpc.AgentServiceStub, report: apb.ReportJobRequest) -> str:
    """'refused: <code>' or 'stop: <reason>' or 'stored' for one report on its own stream."""
    stream = stub.ReportJob()
    try:
        await stream.write(report)
        answer = await stream.read()
        await stream.done_writing()
    except grpc.aio.AioRpcError as exc:
        return f"refused: {exc.code().name}"
    return f"stop: {answer.reason}" if answer.stop else "stored"


async def test_agents_reports_on_a_job_not_assigned_to_them_are_refused_and_nothing_is_stored(secured, figures):
    t, owned, databases = secured
    beta = (await t.call("POST", "/api/v1/projects", t.admin, json={"name": "beta"})).json()["id"]
    bob = await t.new_key("bob", {beta: "admin"})
    files = {"file": ("b.jsonl", chat_jsonl(4), "application/jsonl")}
    beta_data = (await t.call("POST", "/api/v1/datasets", bob, files=files, data={"name": "b"})).json()["id"]
    beta_job = await t.call("POST", "/api/v1/jobs", bob, json={"model_id": "tiny-test", "dataset_id": beta_data})
    assert beta_job.status_code == 201, beta_job.text
    beta_job_id = beta_job.json()["id"]
    a_channel, a = agent_stub(t, await join_agent(t.services.jobs_address, "node-a"))
    b_channel, b = agent_stub(t, await join_agent(t.services.jobs_address, "node-b"))
    try:
        resources = apb.AgentResources(cpu_count=1, memory_bytes=1 << 30, slots=1)
        a_id = (await a.RegisterAgent(apb.RegisterAgentRequest(name="node-a", resources=resources))).agent_id
        b_id = (await b.RegisterAgent(apb.RegisterAgentRequest(name="node-b", resources=resources))).agent_id
        stream = a.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=a_id))
        assignment = (await stream.read()).assignment  # the oldest job, alpha's
        stream.cancel()
        assert assignment.job_id == owned.job_id
        before = await database_state(databases)
        outside = f"file://{t.tmp_path}/outside/checkpoint-7"
        attempts = {
            # B on A's job under its own id, and under A's; B and A on beta's queued job (assigned to nobody);
            # A on its own job under an earlier attempt (a fenced, stale run).
            "B on A's job": (b, b_id, owned.job_id, assignment.attempt),
            "B as A": (b, a_id, owned.job_id, assignment.attempt),
            "B on beta's job": (b, b_id, beta_job_id, 1),
            "A on beta's job": (a, a_id, beta_job_id, 1),
            "A, stale attempt": (a, a_id, owned.job_id, assignment.attempt - 1),
        }
        outcomes = []
        for label, (stub, agent_id, job_id, attempt) in attempts.items():
            for report in forged_reports(job_id, attempt, agent_id, outside):
                outcomes.append((label, report.WhichOneof("report"), await send_report(stub, report)))
        assert all(o[2] != "stored" for o in outcomes), [o for o in outcomes if o[2] == "stored"]
        # Speaking as another agent is an authorization failure; a job not (or no longer) one's own, a fence
        # that tells the agent to stop that run.
        assert {o[2] for o in outcomes if o[0] == "B as A"} == {"refused: PERMISSION_DENIED"}, outcomes
        assert all(o[2].startswith("stop: ") for o in outcomes if o[0] != "B as A"), outcomes
        assert await database_state(databases) == before
        assert not (t.tmp_path / "outside").exists()
    finally:
        for channel in (a_channel, b_channel):
            await channel.close()
    for key, job_id, state in ((owned.key, owned.job_id, "STARTING"), (bob, beta_job_id, "QUEUED")):
        job = (await t.call("GET", f"/api/v1/jobs/{job_id}", key)).json()
        assert job["state"] == state, job
        logs = (await t.call("GET", f"/api/v1/jobs/{job_id}/logs", key)).text
        assert "forged" not in logs
    figures.record("forged agent reports refused", len(outcomes), "reports", goal="all, nothing stored")


# -- a custom method's files stay in the methods directory ----------------------------------------------------

# Stage files are paths relative to the agent's methods directory (methods come as a definition naming files
# already on the node: no archive or upload of code exists to unpack), so these are the ways out.
ESCAPING_FILES = (
    "../x.py",
    "/etc/passwd",
    "/etc/x.py",
    "a/../../b.py",
    "a/../b.py",
    "..",
    "~/x.py",
    "~root/x.py",
    "C:/x.py",
    "a\\..\\..\\x.py",
    "./../x.py",
    "a/./../../x.py",
    " ../x.py",
    "x.py\n../y.py",
    "x.py\x00.txt",
    "",
)
ESCAPING_NAMES = ("../x", "a/b", "..", "/abs", "a\\b", ".", "x/../y")
ESCAPING_ENVS = ("../env", "/usr/bin/python", "a/b", "..", "~/env")


def method_definition(name: str = "safe", file: str = "team/train.py", env: str = "base") -> dict[str, Any]:
    return {
        "name": name,
        "training_type": "chat",
        "lifecycle": "complete",
        "stages": {"training": {"file": file, "env": env}, "saving": {"file": "team/save.py"}},
    }


async def test_method_files_names_and_environments_that_would_leave_their_directory_are_refused_by_field(
    secured, figures
):
    t, owned, databases = secured
    before, files_before = await database_state(databases), files_under(t.tmp_path)
    tried: list[tuple[dict[str, Any], str]] = []
    for bad in ESCAPING_FILES:
        tried.append((method_definition(file=bad), "definition.stages.training.file"))
        saving = method_definition()
        saving["stages"]["saving"]["file"] = bad
        tried.append((saving, "definition.stages.saving.file"))
    tried += [(method_definition(name=bad), "definition.name") for bad in ESCAPING_NAMES]
    tried += [(method_definition(env=bad), "definition.stages.training.env") for bad in ESCAPING_ENVS]
    for definition, field in tried:
        resp = await t.call("POST", "/api/v1/methods", owned.key, json=definition)
        assert resp.status_code == 400, (definition, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert field in [v["field"] for v in error.get("violations", [])] or error.get("field") == field, (
            definition,
            error,
        )
    # Nothing was added: not a row, not a file anywhere under the test's root (artifacts, uploads, models).
    assert await database_state(databases) == before
    assert files_under(t.tmp_path) == files_before
    # The same definition with plain paths is accepted, so the refusals above are the paths' doing.
    assert (await t.call("POST", "/api/v1/methods", owned.key, json=method_definition())).status_code == 201
    figures.record("custom method escape attempts refused", len(tried), "definitions", goal="all, by field")
