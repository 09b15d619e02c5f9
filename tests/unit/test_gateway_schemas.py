"""The JSON Schema the gateway derives from a message's descriptor takes what to_json writes and nothing else."""

from __future__ import annotations

import copy
import math
from typing import Any

import jsonschema_rs
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2, text_format, timestamp_pb2

from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_gateway.app import create_app
from tuneforge_gateway.openai_compat import file_object, job_object
from tuneforge_gateway.schemas import message_ref, message_schemas, to_json

TIME = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5000)


def validator(message: Any) -> jsonschema_rs.Validator:
    """A validator of to_json(message)'s schema: its component, the others it references beside it."""
    descriptor = message.DESCRIPTOR
    root = {"$ref": message_ref(descriptor)["$ref"], "components": {"schemas": message_schemas(descriptor)}}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def job(**fields: Any) -> jpb.Job:
    parameters = struct_pb2.Struct()
    parameters.update({"learning_rate": 2e-4, "epochs": 3, "note": None, "targets": ["q", "v"]})
    found = jpb.Job(
        id="job-1",
        model_id="m",
        dataset_id="d",
        method_id="sft-lora",
        parameters=parameters,
        state=jpb.JOB_STATE_RUNNING,
        attempt=1,
        current_step=2**40,
        progress_percent=12.5,
        create_time=TIME,
        start_time=TIME,
        labels={"team": "nlp", "value": "x"},
        resources=jpb.ResourceRequest(gpu_count=1, min_gpu_memory_bytes=8 * 2**30, agent_labels={"gpu": "a100"}),
        tokens_seen=123,
    )
    found.MergeFrom(jpb.Job(**fields))
    return found


def dataset(**fields: Any) -> compb.Dataset:
    problems = [compb.ValidationProblem(line=3, field="messages[0].role", message="unknown role")]
    found = compb.Dataset(
        id="ds-1",
        name="chats",
        size_bytes=2**33,
        row_count=10,
        format=compb.DATASET_FORMAT_CHAT,
        columns=["messages"],
        create_time=TIME,
        status=compb.DATASET_STATUS_INVALID,
        validation=compb.DatasetValidation(problems=problems, problem_count=1),
    )
    found.MergeFrom(compb.Dataset(**fields))
    return found


MESSAGES = {
    "a job": job(),
    "a job with nothing set": jpb.Job(),
    "a job whose progress is not a number": job(progress_percent=math.nan, remaining_seconds=math.inf),
    "a dataset": dataset(),
    "a dataset with nothing set": compb.Dataset(),
    "a page of jobs": jpb.ListJobsResponse(jobs=[job(), jpb.Job(id="job-2")], next_page_token="t"),
    "an empty page of jobs": jpb.ListJobsResponse(),
    "a method (repeated enums, optional doubles, a Value)": compb.TrainingMethod(
        id="sft-lora",
        parameters=[
            compb.ParameterSpec(name="lr", type=compb.PARAMETER_TYPE_FLOAT, minimum=0, default_value=struct_pb2.Value())
        ],
        dataset_formats=[compb.DATASET_FORMAT_CHAT, compb.DATASET_FORMAT_PROMPT_COMPLETION],
    ),
    "an update of a oneof": jpb.WatchJobResponse(cursor="c", metric=jpb.MetricPoint(name="loss", step=3, value=1.5)),
    "a split": cpb.SplitDatasetResponse(train=dataset(), validation=dataset()),
}


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_what_to_json_writes_is_valid(message):
    body = to_json(message)
    errors = [f"{e.instance_path}: {e.message}" for e in validator(message).iter_errors(body)]
    assert not errors, (errors, body)


def test_to_json_writes_http_names_and_numbers_everywhere():
    body = to_json(job())
    assert (body["state"], body["current_step"], body["resources"]["min_gpu_memory_bytes"]) == ("RUNNING", 2**40, 2**33)
    assert body["parameters"]["epochs"] == 3 and isinstance(body["parameters"]["epochs"], int)
    assert body["labels"] == {"team": "nlp", "value": "x"}
    assert to_json(jpb.Job())["state"] is None
    method = to_json(MESSAGES["a method (repeated enums, optional doubles, a Value)"])
    assert method["dataset_formats"] == ["chat", "prompt_completion"]  # as a dataset's own format is written
    assert method["parameters"][0]["type"] == "float"


def mutated(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `body` with the value at the dotted path replaced (or, for ..., removed)."""
    *parents, last = path.split(".")
    changed = copy.deepcopy(body)
    node: Any = changed
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return changed


WRONG = [
    ("a job", "current_step", "5"),  # a 64-bit integer as MessageToDict writes it, before _tidy
    ("a job", "attempt", 1.5),
    ("a job", "attempt", 2**31),
    ("a job", "state", "JOB_STATE_RUNNING"),  # the proto name, not the HTTP one
    ("a job", "state", "running"),
    ("a job", "progress_percent", "12.5"),
    ("a job", "labels", {"team": 1}),
    ("a job", "labels", ["team"]),
    ("a job", "parameters", [1]),
    ("a job", "create_time", "yesterday"),
    ("a job", "resources.gpu_count", None),
    ("a job", "resources.agent_labels", None),
    ("a job", "id", ...),  # always written
    ("a job", "color", "blue"),  # no such field
    ("a dataset", "format", "CHAT"),  # this enum's names are lower case
    ("a dataset", "status", "invalid"),  # and this one's upper case
    ("a dataset", "size_bytes", "8589934592"),
    ("a dataset", "row_count", 10.5),
    ("a dataset", "validation.problems.0.line", "3"),
    ("a dataset", "validation.problems.0.message", None),
    ("a dataset", "columns", "messages"),
    ("a page of jobs", "jobs.1.state", "QUEUED!"),
    ("a page of jobs", "jobs", {"job-1": {}}),
    ("a page of jobs", "next_page_token", None),
    ("a method (repeated enums, optional doubles, a Value)", "dataset_formats", ["DATASET_FORMAT_CHAT"]),
    ("a method (repeated enums, optional doubles, a Value)", "parameters.0.minimum", None),
    ("an update of a oneof", "job", {}),  # a second member of the oneof
]


@pytest.mark.parametrize("name,path,value", WRONG, ids=[f"{n}: {p}={v!r}" for n, p, v in WRONG])
def test_a_body_with_a_wrong_type_is_refused(name, path, value):
    message = MESSAGES[name]
    body = mutated(to_json(message), path, value)
    assert not validator(message).is_valid(body), body


def test_every_message_a_schema_references_is_a_component_of_its_own():
    schemas = message_schemas(jpb.CompareJobsResponse.DESCRIPTOR)
    assert set(schemas) == {
        "tuneforge.jobs.v1.CompareJobsResponse",
        "tuneforge.jobs.v1.Job",
        "tuneforge.jobs.v1.ResourceRequest",
        "tuneforge.jobs.v1.ParameterDifference",
        "tuneforge.jobs.v1.ComparedMetric",
        "tuneforge.jobs.v1.MetricSeries",
        "tuneforge.jobs.v1.SeriesPoint",
    }
    job_schema = schemas["tuneforge.jobs.v1.Job"]
    assert job_schema["properties"]["resources"] == {"$ref": "#/components/schemas/tuneforge.jobs.v1.ResourceRequest"}
    # Messages are written only when set; every field without presence always is.
    assert {"id", "state", "labels", "current_step"} <= set(job_schema["required"])
    assert not {"resources", "create_time", "parameters"} & set(job_schema["required"])


# A message type that contains itself, directly, in a list and as map values (none of ours does yet).
TREE_PROTO = """
name: "tree.proto" package: "test.tree" syntax: "proto3"
message_type {
  name: "Node"
  field { name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "parent" number: 2 type: TYPE_MESSAGE type_name: ".test.tree.Node" label: LABEL_OPTIONAL }
  field { name: "children" number: 3 type: TYPE_MESSAGE type_name: ".test.tree.Node" label: LABEL_REPEATED }
  field { name: "by_name" number: 4 type: TYPE_MESSAGE type_name: ".test.tree.Node.ByNameEntry" label: LABEL_REPEATED }
  field { name: "counts" number: 5 type: TYPE_MESSAGE type_name: ".test.tree.Node.CountsEntry" label: LABEL_REPEATED }
  nested_type {
    name: "ByNameEntry" options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_MESSAGE type_name: ".test.tree.Node" label: LABEL_OPTIONAL }
  }
  nested_type {
    name: "CountsEntry" options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_INT64 label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_INT64 label: LABEL_OPTIONAL }
  }
}
"""


def recursive_message() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(TREE_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("test.tree.Node"))


def test_a_message_that_contains_itself_is_one_component_referencing_itself():
    node_class = recursive_message()
    leaf = node_class(name="leaf", counts={2**40: 2**41})
    root = node_class(name="root", children=[leaf], by_name={"leaf": leaf}, parent=node_class(name="up"))
    assert set(message_schemas(node_class.DESCRIPTOR)) == {"test.tree.Node"}
    body = to_json(root)
    assert body["by_name"]["leaf"]["counts"] == {str(2**40): 2**41}  # a map's 64-bit values are numbers too
    assert validator(root).is_valid(body)
    assert not validator(root).is_valid(mutated(body, "children.0.counts", {"1": "2"}))
    assert not validator(root).is_valid(mutated(body, "by_name.leaf.name", 7))
    assert not validator(root).is_valid(mutated(body, "counts", {"x": 1}))


# -- in the gateway's OpenAPI document -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict[str, Any]:
    app = create_app("127.0.0.1:9", "127.0.0.1:9", upload_dir=tmp_path_factory.mktemp("spool"))
    return app.openapi()


def component_validator(document: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def test_every_json_success_declares_its_shape_and_every_reference_resolves(document):
    untyped, refs = [], set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith("2") and schema is not None and not {"$ref", "properties"} & set(schema):
                    untyped.append(f"{method.upper()} {path} {status}: {schema}")
    assert not untyped

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].removeprefix("#/components/schemas/"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    assert refs - set(document["components"]["schemas"]) == set()
    assert {"tuneforge.jobs.v1.Job", "FineTuningJob", "UploadState"} <= refs


def openai_job(method_id: str, state: Any, **fields: Any) -> dict[str, Any]:
    parameters = struct_pb2.Struct()
    parameters.update({"epochs": 1.5, "batch_size": 4, "learning_rate": 4e-4, "seed": 7, "beta": 0.1})
    labels = {"team": "nlp", "openai.suffix": "v2"}
    message = job(method_id=method_id, state=state, parameters=parameters, labels=labels, **fields)
    return job_object(message)


OPENAI_JOBS = {
    "queued": openai_job("sft-lora", jpb.JOB_STATE_QUEUED),
    "running dpo": openai_job("dpo", jpb.JOB_STATE_RUNNING, remaining_seconds=60, update_time=TIME),
    "failed": openai_job("sft-lora", jpb.JOB_STATE_FAILED, state_reason="out of memory", end_time=TIME),
    "succeeded": openai_job("sft-lora", jpb.JOB_STATE_SUCCEEDED, output_uri="/out", end_time=TIME),
    "a custom method": openai_job("my-method", jpb.JOB_STATE_CANCELLED),
    "with nothing set": job_object(jpb.Job()),
}


@pytest.mark.parametrize("body", OPENAI_JOBS.values(), ids=OPENAI_JOBS.keys())
def test_an_openai_job_is_a_fine_tuning_job_as_declared(document, body):
    errors = [
        f"{e.instance_path}: {e.message}" for e in component_validator(document, "FineTuningJob").iter_errors(body)
    ]
    assert not errors, (errors, body)


def test_an_openai_file_is_a_file_as_declared(document):
    files = [
        file_object(dataset()),
        file_object(compb.Dataset()),
        file_object(dataset(status=compb.DATASET_STATUS_READY)),
    ]
    assert files[0]["status_details"] and files[0]["status"] == "error"
    for body in files:
        assert component_validator(document, "OpenAIFile").is_valid(body), body
    assert not component_validator(document, "OpenAIFile").is_valid(files[0] | {"bytes": "8"})
    assert not component_validator(document, "FineTuningJob").is_valid(OPENAI_JOBS["queued"] | {"status": "done"})
