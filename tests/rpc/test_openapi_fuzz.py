"""Property-based run of the whole REST API from the gateway's own OpenAPI document (schemathesis).

The gateway runs in process (ASGI) over the real catalog and jobs services on PostgreSQL, seeded with a model, a
READY dataset, a queued job, a job that ran (metrics, logs, a checkpoint) and an open resumable upload. Path and
query ids are drawn half the time from those, so requests reach existing resources as well as unknown ones.

Every generated request must get a documented status (never a 5xx) and a body that matches the documented schema
and content type; every 4xx must be the documented error shape of its API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import schemathesis
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.failures import ServerError
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.python.asgi import shutdown_lifespans
from starlette.testclient import TestClient

from tests.helpers import chat_jsonl, write_fake_model_dir
from tests.stack import SEED_MODEL_ID, Services, catalog_and_jobs
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.common.v1 import common_pb2
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_gateway.app import MAX_UPLOAD_BYTES, UPLOAD_TTL_S, create_app
from tuneforge_gateway.uploads import UploadSpool

# Bounded so the run stays near a minute on a 2-core machine; derandomized so a failure reproduces.
MAX_EXAMPLES = 12


@dataclass
class Seeded:
    model_id: str
    dataset_id: str
    queued_job_id: str
    trained_job_id: str
    upload_id: str


async def report(services: Services, job_id: str, *reports: dict[str, Any]) -> None:
    """Play an agent: take the job's assignment and report on it, then wait for every report's ack."""
    channel = grpc.aio.insecure_channel(services.jobs_address)
    agents = agent_pb2_grpc.AgentServiceStub(channel)
    agent = await agents.RegisterAgent(
        apb.RegisterAgentRequest(name="fuzz-agent", resources=apb.AgentResources(slots=1)), timeout=10
    )
    assignments = agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=agent.agent_id))
    assignment = (await asyncio.wait_for(assignments.read(), 10)).assignment
    assert assignment.job_id == job_id
    assignments.cancel()
    requests = [
        apb.ReportJobRequest(agent_id=agent.agent_id, job_id=job_id, attempt=assignment.attempt, seq=seq, **r)
        for seq, r in enumerate(reports, start=1)
    ]
    call = agents.ReportJob()
    for request in requests:
        await call.write(request)
    acked = 0
    while acked < len(requests):
        acked = (await asyncio.wait_for(call.read(), 10)).acked_seq
    await call.done_writing()
    call.cancel()
    await channel.close()


async def seed(services: Services, artifacts: Path) -> tuple[str, str, str]:
    async def upload_requests():
        yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name="fuzz-chats"))
        yield cpb.UploadDatasetRequest(chunk=chat_jsonl(6))

    dataset = (await services.catalog.UploadDataset(upload_requests(), timeout=30)).dataset
    assert dataset.status == common_pb2.DATASET_STATUS_READY
    submit = jpb.SubmitJobRequest(model_id=SEED_MODEL_ID, dataset_id=dataset.id, method_id="sft-lora")
    trained = (await services.jobs.SubmitJob(submit, timeout=10)).job
    checkpoint = write_fake_model_dir(artifacts / "jobs" / trained.id / "checkpoint-2")
    await report(
        services,
        trained.id,
        {"state": apb.StateReport(state=apb.REPORTED_STATE_RUNNING)},
        *(
            {"metric": apb.MetricReport(step=step, values={"loss": 3.0 / step, "learning_rate": 1e-4}, total_steps=2)}
            for step in (1, 2)
        ),
        {"log": apb.LogReport(stream="stdout", text="step 2 done")},
        {"checkpoint": apb.CheckpointReport(step=2, uri=str(checkpoint), metrics={"loss": 1.5})},
        {"state": apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED, output_uri=str(checkpoint))},
    )
    queued = (await services.jobs.SubmitJob(submit, timeout=10)).job
    return dataset.id, queued.id, trained.id


def fuzz_config(seeded: Seeded) -> schemathesis.Config:
    known = {
        "model_id": [seeded.model_id],
        "dataset_id": [seeded.dataset_id],
        "file_id": [seeded.dataset_id],
        "job_id": [seeded.queued_job_id, seeded.trained_job_id],
        "method_id": ["sft-lora", "dpo"],
        "upload_id": [seeded.upload_id],
    }
    parameters = {
        f"{location}.{name}": {"dictionary": name, "probability": 0.5}
        for name in known
        for location in ("path", "query")
    }
    return schemathesis.Config.from_dict(
        {
            "dictionaries": {name: {"values": values} for name, values in known.items()},
            "parameters": parameters,
            # NUL characters in strings are refused by the services (tests/integration/test_nul_characters.py),
            # a rule of PostgreSQL's text that the document does not repeat on every string.
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "allow-x00": False,
            },
            # Each operation on its own: a stateful walk over links would need links the document does not have.
            "phases": {"stateful": {"enabled": False}},
            # Every body, success and error alike, must match its documented schema (formats too: date-times).
            "checks": {"response_schema_conformance": {"enabled": True, "validate-formats": True}},
            "request-timeout": 30,
            # The event stream of a live job never ends by itself: take its first events and stop.
            "operations": [
                {"include-path": "/api/v1/jobs/{job_id}/events", "max-stream-events": 2, "request-timeout": 3}
            ],
        }
    )


@pytest.fixture
def gateway_schema(postgres_url, second_postgres_url, tmp_path) -> Iterator[schemathesis.BaseSchema]:
    # The services run on an event loop of their own; schemathesis runs the gateway app on another.
    with start_blocking_portal() as portal:
        stack = catalog_and_jobs(postgres_url, second_postgres_url, tmp_path)
        with portal.wrap_async_context_manager(stack) as services:
            dataset_id, queued_id, trained_id = portal.call(seed, services, tmp_path / "artifacts")
            spool_dir = tmp_path / "spool"
            upload = UploadSpool(spool_dir, MAX_UPLOAD_BYTES, UPLOAD_TTL_S).create("fuzz", "", "", "", "", None)
            seeded = Seeded(SEED_MODEL_ID, dataset_id, queued_id, trained_id, upload.upload_id)
            app = create_app(services.catalog_address, services.jobs_address, upload_dir=spool_dir)
            schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config(seeded))

            @schema.hook("filter_failure")
            def keep_what_the_document_could_state(context, failure, case, response) -> bool:
                return not (
                    refused_beyond_json_schema(failure, response)
                    or over_the_upload_limit(failure, response)
                    or hub_unreachable(failure, case, response)
                )

            # Before the run, which may cancel or delete the seeded jobs.
            answer_successes_seldom_generated(schema, seeded, spool_dir)
            statuses: dict[str, set[int]] = {}

            @schema.hook("after_call")
            def record_status(context, case, response) -> None:
                statuses.setdefault(case.operation.label, set()).add(response.status_code)

            yield schema
            shutdown_lifespans()
            # The seeded resources were reached, not only unknown ids.
            unreached = [label for label in READS_OF_SEEDED if 200 not in statuses.get(label, set())]
            assert not unreached, f"no 200 from {unreached}: {statuses}"


def answer_successes_seldom_generated(schema: schemathesis.BaseSchema, seeded: Seeded, spool_dir: Path) -> None:
    """Successes generated requests seldom reach (they need a valid body and ids that fit together), each checked
    as a generated request's answer is: documented status, and a body that matches the documented schema."""

    def call(method: str, path: str, status: int, **parts: Any) -> Any:
        response = schema[path][method].Case(**parts).call_and_validate()
        assert response.status_code == status, (method, path, response.status_code, response.text)
        return response

    job = {"path_parameters": {"job_id": seeded.trained_job_id}}
    submit = {"model_id": seeded.model_id, "dataset_id": seeded.dataset_id}
    call("POST", "/api/v1/jobs", 200, body=submit | {"dry_run": True})  # only the estimate
    call("POST", "/api/v1/jobs", 201, body=submit)  # the job, with its estimate
    call("POST", "/api/v1/jobs/{job_id}/copy", 201, body={"name": "copied"}, **job)
    ids = [seeded.queued_job_id, seeded.trained_job_id]
    call("GET", "/api/v1/jobs/compare", 200, query={"job_id": ids, "name": ["loss"], "max_points": 5})
    downsampled = call("GET", "/api/v1/jobs/{job_id}/metrics", 200, query={"max_points": 5}, **job)
    assert "count" in downsampled.json()["points"][0], downsampled.text  # a bucket, as the document declares too
    call("GET", "/api/v1/jobs/{job_id}/logs", 200, query={"format": "text"}, **job)
    call("POST", "/api/v1/jobs/{job_id}/publish", 201, body={"step": 2, "name": "fuzz-published"}, **job)
    upload = UploadSpool(spool_dir, MAX_UPLOAD_BYTES, UPLOAD_TTL_S).create("chats", "", "", "", "", None)
    content = chat_jsonl(3)
    parts = {"path_parameters": {"upload_id": upload.upload_id}}
    headers = {"Content-Range": f"bytes 0-{len(content) - 1}/{len(content)}"}
    call("PUT", "/api/v1/uploads/{upload_id}", 200, headers=headers, body=content, **parts)
    call("POST", "/api/v1/uploads/{upload_id}/complete", 201, **parts)
    created = call(
        "POST", "/v1/fine_tuning/jobs", 200, body={"model": seeded.model_id, "training_file": seeded.dataset_id}
    )
    call("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", 200, path_parameters={"job_id": created.json()["id"]})


# Reads that must have found a seeded resource at least once during the run.
READS_OF_SEEDED = [
    "GET /api/v1/models/{model_id}",
    "GET /api/v1/datasets/{dataset_id}",
    "GET /api/v1/datasets/{dataset_id}/preview",
    "GET /api/v1/jobs/{job_id}",
    "GET /api/v1/jobs/{job_id}/metrics",
    "GET /api/v1/jobs/{job_id}/checkpoints",
    "GET /api/v1/jobs/{job_id}/events",
    "GET /api/v1/uploads/{upload_id}",
    "GET /v1/files/{file_id}",
    "GET /v1/fine_tuning/jobs/{job_id}/events",
]


# A schema-valid request may still be refused with a 400 for what no JSON Schema can say: these fields (or the
# fields under them) depend on server state or on another field. Any other 400 for a valid request fails the run.
BEYOND_JSON_SCHEMA = {
    "page_token": "an opaque cursor the service issued",
    "after": "the id of an item in the list (OpenAI's cursor)",
    "parameters": "the chosen method's own parameter table",
    "parameter_overrides": "the copied job's method's parameter table",
    "max_step": "must not be below min_step",
    "source": "exactly one of path, uri and hub_id",
    "clear_validation_dataset": "not together with validation_dataset_id",
    "path": "a model directory on the catalog's machine",
    "uri": "a model directory in the artifact store",
    "hub_id": "a model on the Hugging Face Hub",
    "definition.stages": "the stages the method's lifecycle needs",
    "definition.deployment_environment": "used by the live lifecycle only",
    "definition.parameters": "parameter specs (params.parse_param_spec)",
    "Content-Range": "START <= END < TOTAL, and TOTAL the upload's size once known",
    "hyperparameters": "passed to the chosen method as given: its own parameter table (beta: the dpo method only)",
    "roles": "at least one project role, unless the key is a superuser's",
}


def refused_beyond_json_schema(failure: Any, response: Any) -> bool:
    """A schema-valid request's 400 that names only fields whose rules no JSON Schema can state."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return False
    error = response.json().get("error", {})
    fields = [v["field"] for v in error.get("field_violations") or []] or [error.get("field") or error.get("param")]
    return all(
        field and any(field == name or field.startswith((f"{name}.", f"{name}[")) for name in BEYOND_JSON_SCHEMA)
        for field in fields
    )


def over_the_upload_limit(failure: Any, response: Any) -> bool:
    """A declared size or a Content-Range past the gateway's upload limit is a 413 on `size`: the limit is the
    deployment's setting (create_app's max_upload_bytes), which a static document can't state, and a
    Content-Range header's end can't carry a JSON Schema maximum at all."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 413:
        return False
    error = response.json().get("error", {})
    return error.get("code") == "RESOURCE_EXHAUSTED" and error.get("field") == "size"


def hub_unreachable(failure: Any, case: Any, response: Any) -> bool:
    """Registering a Hub id is a 503 here, as on any machine without internet access (HF_HUB_OFFLINE=1)."""
    return (
        isinstance(failure, ServerError)
        and response.status_code == 503
        and isinstance(case.body, dict)
        and bool(case.body.get("hub_id"))
        and "Hugging Face Hub" in response.json()["error"]["message"]
    )


def error_bodies_have_their_apis_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response, case) -> None:
    """Every 4xx is JSON: {"error": {code, message, field}} under /api/v1, OpenAI's shape under /v1."""
    if not 400 <= response.status_code < 500 or case.method.upper() == "HEAD":
        return
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"{response.status_code}: {body}"
    error = body["error"]
    if case.path.startswith("/v1/"):
        assert set(error) >= {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str)
    else:
        assert set(error) >= {"code", "message", "field"}, error
        assert isinstance(error["code"], str) and error["code"].isupper()
        assert isinstance(error["message"], str) and error["message"]
        assert error["field"] is None or isinstance(error["field"], str)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's from_fixture reads Node._nodeid, which pytest 9.2 no longer has (it keeps Node._id).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("gateway_schema")


@settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@schema.parametrize()
def test_every_route_answers_generated_requests_as_its_openapi_document_says(case):
    case.call_and_validate(additional_checks=[error_bodies_have_their_apis_shape])


# -- free-form JSON objects ----------------------------------------------------------------------------------
# Parameters, overrides and method definitions become protobuf Structs, whose numbers are doubles. schemathesis
# draws small numbers; these tests draw integers beyond a double's range anywhere in such an object.

HUGE = st.integers(min_value=2**1024, max_value=10**400) | st.integers(min_value=-(10**400), max_value=-(2**1024))
SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text("abc", min_size=1, max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def object_with_a_huge_integer(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A JSON object with one integer too large for a double somewhere in it, and that integer's path."""
    key = draw(st.sampled_from(["learning_rate", "epochs", "lora_rank"]))
    obj = draw(st.dictionaries(st.sampled_from(["seed", "max_steps", "note"]), SMALL_JSON, max_size=2))
    value, inner_path = draw(HUGE), ""
    for wrap_in_list in draw(st.lists(st.booleans(), max_size=2)):  # wrapped from the inside out
        value, inner_path = ([value], f"[0]{inner_path}") if wrap_in_list else ({"x": value}, f".x{inner_path}")
    return obj | {key: value}, key + inner_path


@pytest.fixture
def gateway_alone(tmp_path) -> Iterator[TestClient]:
    """The gateway with no services behind it: what is refused here never reaches them."""
    app = create_app("127.0.0.1:9", "127.0.0.1:9", upload_dir=tmp_path / "spool")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/api/v1/jobs", lambda obj: {"model_id": "m", "dataset_id": "d", "parameters": obj}, "parameters"),
        ("/api/v1/jobs/j-1/copy", lambda obj: {"parameter_overrides": obj}, "parameter_overrides"),
        ("/v1/fine_tuning/jobs", lambda obj: {"model": "m", "training_file": "f", "hyperparameters": obj}, None),
    ],
)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=object_with_a_huge_integer())
def test_an_integer_beyond_a_double_anywhere_in_parameters_is_a_400_naming_it(gateway_alone, path, body, field, case):
    obj, where = case
    resp = gateway_alone.post(path, content=json.dumps(body(obj)), headers={"content-type": "application/json"})
    assert resp.status_code == 400, (resp.status_code, resp.text)
    error = resp.json()["error"]
    if field is None:  # OpenAI's shape and names (TuneForge's epochs is its n_epochs)
        assert error["param"].startswith("hyperparameters."), error
    else:
        assert error["field"] == f"{field}.{where}", error


@pytest.mark.parametrize(
    "path,error",
    [
        ("/api/v1/boom", {"code": "INTERNAL", "message": "internal error", "field": None}),
        ("/v1/boom", {"message": "internal error", "type": "server_error", "param": None, "code": "internal"}),
    ],
)
def test_an_unexpected_exception_is_a_json_500_in_the_apis_error_shape(tmp_path, path, error):
    app = create_app("127.0.0.1:9", "127.0.0.1:9", upload_dir=tmp_path / "spool")

    async def boom() -> None:
        raise RuntimeError("a bug's text that must not reach the client")

    app.add_api_route(path, boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get(path)
    assert (resp.status_code, resp.json()) == (500, {"error": error})


@pytest.mark.parametrize(
    "method,path,field",
    [
        ("POST", "/api/v1/jobs", "body"),  # no body at all
        ("GET", "/api/v1/models?page_size=many", "page_size"),  # a query parameter, without its location
        ("GET", "/api/v1/jobs/compare?job_id=a", "job_id"),
    ],
)
def test_a_request_the_document_refuses_is_a_400_naming_the_field(gateway_alone, method, path, field):
    resp = gateway_alone.request(method, path)
    assert resp.status_code == 400 and resp.json()["error"]["field"] == field, resp.text


def test_a_method_a_path_lacks_is_a_405_allowing_exactly_the_paths_methods(gateway_alone):
    resp = gateway_alone.put("/api/v1/models/m-1")
    assert resp.status_code == 405 and resp.headers["allow"] == "DELETE, GET, PATCH"
    assert resp.json()["error"]["code"] == "UNIMPLEMENTED"
    # /jobs/compare is its own resource, though the template /jobs/{job_id} (GET, DELETE) matches it too.
    assert gateway_alone.post("/api/v1/jobs/compare").headers["allow"] == "GET"
