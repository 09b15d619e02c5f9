"""Bad input (issue 11): malformed requests and files, each answered with a 4xx naming the field or line at
fault, never a 5xx, and never a partial write.

Two sources of cases:
- bad_input/cases.yaml, written by hand: wrong types, huge values, negative steps, path traversal, oversized
  uploads, truncated multipart, invalid UTF-8, deep nesting and unknown enum values over every kind of route,
  some over gRPC straight to the services (INVALID_ARGUMENT with field violations);
- cases generated from the gateway's own OpenAPI document, so a new field or route is covered without a new
  line here: SQL and shell metacharacters and traversal strings in every string field of every body and every
  string query parameter, a wrong type in every body field, 100000 levels of nesting and invalid UTF-8 in every
  JSON body, traversal and NUL in every path id, negative and huge values in every integer query parameter.

The stack: the real catalog and jobs services on PostgreSQL (tests/stack.py) and the gateway app in process, its
upload limit small so an oversized upload is cheap. Before and after each refused case the test takes a
fingerprint of everything a request could write: every table of both databases (its row count and the newest row
version's transaction id, xmin, so an update shows as well as an insert or a delete) and the file trees under the
artifact root and the upload spool. A string with metacharacters in a free-text field is valid: accepted, it must
be stored and read back verbatim.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import yaml
from anyio.from_thread import BlockingPortal, start_blocking_portal
from google.protobuf import json_format
from starlette.testclient import TestClient

from tests.reliability.conftest import scale
from tests.rpc.test_openapi_fuzz import seed
from tests.stack import SEED_MODEL_ID, Services, catalog_and_jobs
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_common.grpcutil import decode_error
from tuneforge_gateway.app import UPLOAD_TTL_S, create_app
from tuneforge_gateway.uploads import UploadSpool

HERE = Path(__file__).parent / "bad_input"
CATEGORIES = (
    "wrong_type",
    "huge_value",
    "negative_step",
    "path_traversal",
    "oversized_upload",
    "truncated_multipart",
    "invalid_utf8",
    "deep_nesting",
    "unknown_enum",
    "metacharacters",
)
# Small, so an oversized upload costs a few hundred kilobytes (multipart gets 64 KiB of overhead on top).
UPLOAD_LIMIT = 64 * 1024


@dataclass
class Stack:
    client: TestClient
    portal: BlockingPortal
    services: Services
    database_urls: tuple[str, str]
    roots: tuple[Path, ...]
    ids: dict[str, str]
    connections: list[asyncpg.Connection] = field(default_factory=list)
    tables: list[list[str]] = field(default_factory=list)

    # -- what a request could have written ---------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        rows = self.portal.call(self._rows)
        files = {
            str(path.relative_to(root.parent)): path.stat().st_size
            for root in self.roots
            if root.exists()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }
        return {"rows": rows, "files": files}

    async def _rows(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for index, (conn, tables) in enumerate(zip(self.connections, self.tables, strict=True)):
            query = " UNION ALL ".join(
                f"SELECT '{t}', count(*), coalesce(max(xmin::text::bigint), 0) FROM \"{t}\"" for t in tables
            )
            for name, count, digest in await conn.fetch(query):
                found[f"db{index}.{name}"] = (count, digest)
        return found

    async def _connect(self) -> None:
        for url in self.database_urls:
            conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            self.connections.append(conn)
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
            )
            self.tables.append([r["table_name"] for r in tables])

    async def _close(self) -> None:
        for conn in self.connections:
            await conn.close()

    def answers(self) -> bool:
        """The services and the gateway still answer: a read through the gateway reaches both services."""
        return (
            self.client.get(f"/api/v1/models/{SEED_MODEL_ID}").status_code == 200
            and self.client.get(f"/api/v1/jobs/{self.ids['job']}").status_code == 200
        )

    def grpc_call(self, service: str, method: str, request: Any) -> grpc.aio.AioRpcError | Any:
        stub = getattr(self.services, service)

        async def call() -> Any:
            try:
                if method == "UploadDataset":
                    return await stub.UploadDataset(_upload_stream(request), timeout=30)
                return await getattr(stub, method)(request, timeout=30)
            except grpc.aio.AioRpcError as err:
                return err

        return self.portal.call(call)


async def _upload_stream(requests: list[Any]):
    for request in requests:
        yield request


@contextmanager
def bad_input_stack(catalog_url: str, jobs_url: str, root: Path) -> Iterator[Stack]:
    with start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(catalog_and_jobs(catalog_url, jobs_url, root)) as services:
            dataset_id, queued_id, trained_id = portal.call(seed, services, root / "artifacts")
            model_dir = str(root / "models" / SEED_MODEL_ID)
            # A model of its own for the PATCH cases, which may rename it.
            register = cpb.RegisterModelRequest(name="patch-target", path=model_dir)
            patch_model = portal.call(lambda: services.catalog.RegisterModel(register, timeout=30)).model.id
            spool_dir = root / "spool"
            upload = UploadSpool(spool_dir, UPLOAD_LIMIT, UPLOAD_TTL_S).create("bad-input", "", "", "", "", None)
            app = create_app(
                services.catalog_address, services.jobs_address, upload_dir=spool_dir, max_upload_bytes=UPLOAD_LIMIT
            )
            with TestClient(app, raise_server_exceptions=False) as client:
                ids = {
                    "model": SEED_MODEL_ID,
                    "dataset": dataset_id,
                    "job": queued_id,
                    "trained_job": trained_id,
                    "upload": upload.upload_id,
                    "model_dir": model_dir,
                    "patch_model": patch_model,
                }
                stack = Stack(client, portal, services, (catalog_url, jobs_url), (root / "artifacts", spool_dir), ids)
                portal.call(stack._connect)
                try:
                    yield stack
                finally:
                    portal.call(stack._close)


# -- cases as data -----------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    category: str
    method: str
    path: str
    expect_status: int
    expect_field: str | None = None  # the field (or OpenAI param) the error names; "-" for an error naming none
    expect_message: str | None = None  # a part of the message, e.g. "line 3"
    expect_preview: str | None = None  # an accepted dataset's preview holds this text verbatim
    expect_empty: str | None = None  # an accepted list's key that must be empty (a filter matched nothing)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] | None = None
    data: dict[str, str] | None = None


def _expand(value: Any, ids: dict[str, str]) -> Any:
    """The case file's shorthands: {job} and the like in strings; "@@big:N" is N x's (a 10 MB string without
    a 10 MB file); {"@@nested": N} is N levels of lists."""
    if isinstance(value, str):
        if value.startswith("@@big:"):
            return "x" * int(value.removeprefix("@@big:"))
        if value.startswith("@@nest:"):
            nested: Any = 1
            for _ in range(int(value.removeprefix("@@nest:"))):
                nested = [nested]
            return nested
        return _format_ids(value, ids)
    if isinstance(value, list):
        return [_expand(v, ids) for v in value]
    if isinstance(value, dict):
        return {_expand(k, ids): _expand(v, ids) for k, v in value.items()}
    return value


def _raw(spec: Any, ids: dict[str, str]) -> bytes:
    """A raw body: a string whose characters are its bytes (YAML's "\\xff" is the byte 0xff), or one of
    {base64: ...}, {file: name under bad_input/files}, {nested: N, open: "[", close: "]", before: "", after: ""}."""
    if isinstance(spec, str):
        return _format_ids(spec, ids).encode("latin-1")
    if "base64" in spec:
        return base64.b64decode(spec["base64"])
    if "file" in spec:
        return (HERE / "files" / spec["file"]).read_bytes()
    if "nested" in spec:
        n = int(spec["nested"])
        inner = spec.get("inner", "")
        body = spec.get("open", "[") * n + inner + spec.get("close", "]") * n
        return (_format_ids(spec.get("before", ""), ids) + body + spec.get("after", "")).encode("latin-1")
    if "repeat" in spec:
        return spec["repeat"].encode("latin-1") * int(spec["times"])
    raise ValueError(f"unknown raw body {spec}")


def _format_ids(text: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        text = text.replace("{" + name + "}", value)
    return text


def load_cases(ids: dict[str, str]) -> list[Case]:
    cases = []
    for raw in yaml.safe_load((HERE / "cases.yaml").read_text())["cases"]:
        if "grpc" in raw:
            continue
        expect = raw["expect"]
        case = Case(
            id=raw["id"],
            category=raw["category"],
            method=raw["method"],
            path=_format_ids(raw["path"], ids),
            expect_status=expect["status"],
            expect_field=expect.get("field"),
            expect_message=expect.get("message"),
            expect_preview=expect.get("preview"),
            expect_empty=expect.get("empty"),
            headers={k: _format_ids(str(v), ids) for k, v in (raw.get("headers") or {}).items()},
        )
        if "json" in raw:
            case.json = _expand(raw["json"], ids)
        if "raw" in raw:
            case.content = _raw(raw["raw"], ids)
            case.headers.setdefault("content-type", "application/json")
        if "multipart" in raw:
            parts = raw["multipart"]
            case.data = {k: _format_ids(str(v), ids) for k, v in (parts.get("fields") or {}).items()}
            case.files = {
                key: (spec.get("filename", "data.jsonl"), _raw(spec.get("content", {"file": spec.get("file")}), ids))
                for key, spec in (parts.get("files") or {}).items()
            }
        cases.append(case)
    return cases


def send(stack: Stack, case: Case) -> Any:
    kwargs: dict[str, Any] = {"headers": case.headers}
    if case.json is not None:
        kwargs["json"] = case.json
    if case.content is not None:
        kwargs["content"] = case.content
    if case.files is not None:
        kwargs["files"] = case.files
        kwargs["data"] = case.data
    return stack.client.request(case.method, case.path, **kwargs)


def error_of(path: str, response: Any) -> tuple[str, list[str]]:
    """An error answer's message and the fields it names, checking the error shape of the API the path is in."""
    body = response.json()
    error = body["error"]
    if path.startswith("/v1/"):
        assert set(error) >= {"message", "type", "param", "code"}, body
        return error["message"], [error["param"]] if error["param"] else []
    assert set(error) >= {"code", "message", "field"}, body
    assert error["code"].isupper(), body
    fields = [v["field"] for v in error.get("field_violations") or []] or ([error["field"]] if error["field"] else [])
    return error["message"], fields


def grpc_request(spec: dict[str, Any], ids: dict[str, str]) -> tuple[str, str, Any]:
    """A gRPC case's service, method and request message (a list of messages for the UploadDataset stream)."""
    service, method = spec["call"].split(".")
    module = cpb if service == "catalog" else jpb
    if method == "UploadDataset":
        metadata = json_format.ParseDict(_expand(spec["request"], ids), cpb.DatasetUploadMetadata())
        chunk = _raw(spec.get("chunk", ""), ids)
        return service, method, [cpb.UploadDatasetRequest(metadata=metadata), cpb.UploadDatasetRequest(chunk=chunk)]
    request = json_format.ParseDict(_expand(spec["request"], ids), getattr(module, f"{method}Request")())
    return service, method, request


def grpc_error(err: Any) -> tuple[grpc.StatusCode | None, list[str], str]:
    if not isinstance(err, grpc.aio.AioRpcError):
        return None, [], ""
    decoded = decode_error(err)
    return decoded.code, [f for f, _ in decoded.field_violations], decoded.message


def dumps(value: Any) -> str:
    return json.dumps(value)[:300]


# -- generated cases: every field of every body in the OpenAPI document -------------------------------------------

SQL = "'; DROP TABLE jobs; --"
SHELL = "$(reboot) `reboot` ;|& x"
# Free text may hold these: stored verbatim and read back identical, or refused naming the field; never run.
METACHARACTERS = scale(
    [SQL, SHELL],
    [SQL, SHELL, '" OR 1=1 --', "x'); DELETE FROM models; --", "`rm -rf /`", "a;b|c&d>e<f", "$HOME ${IFS} \\n %s %n"],
)
TRAVERSALS = scale(
    ["../../etc/passwd", "nul\0byte"],
    ["../../etc/passwd", "file:///etc/passwd", "%2e%2e%2f%2e%2e%2fetc", "/etc/passwd", "nul\0byte", "..\\..\\boot.ini"],
)
# A valid body per JSON route, so that one changed field is the only thing wrong with it. {n} makes names unique.
BASE_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/models"): {"name": "gen-model-{n}", "path": "{model_dir}"},
    ("PATCH", "/api/v1/models/{model_id}"): {"description": "patched"},
    ("POST", "/api/v1/methods"): {
        "name": "gen-method-{n}",
        "training_type": "chat",
        "lifecycle": "customized",
        "stages": {"training": {"file": "gen/train.py", "env": "base"}},
    },
    ("POST", "/api/v1/datasets/{dataset_id}/split"): {"validation_ratio": 0.5},
    ("POST", "/api/v1/uploads"): {"name": "gen-upload"},
    ("POST", "/api/v1/projects"): {"name": "gen-project-{n}"},
    ("POST", "/api/v1/keys"): {"name": "gen-key", "superuser": True},
    ("POST", "/api/v1/jobs"): {"model_id": "{model}", "dataset_id": "{dataset}"},
    ("POST", "/api/v1/jobs/{job_id}/copy"): {},
    ("POST", "/api/v1/jobs/{job_id}/publish"): {"step": 2, "name": "gen-published-{n}"},
    ("POST", "/api/v1/models/{model_id}/merge"): {},
    ("POST", "/api/v1/models/{model_id}/evaluate"): {"dataset_id": "{dataset}"},
    ("POST", "/api/v1/models/{model_id}/deploy"): {},
    ("POST", "/v1/fine_tuning/jobs"): {"model": "{model}", "training_file": "{dataset}"},
    ("POST", "/v1/chat/completions"): {"model": "{model}", "messages": [{"role": "user", "content": "hi"}]},
}
# Path parameters: the seeded resource each route acts on (PATCH renames a model of its own, not the seed).
PATH_IDS = {
    "model_id": "{patch_model}",
    "dataset_id": "{dataset}",
    "job_id": "{trained_job}",
    "upload_id": "{upload}",
    "method_id": "sft-lora",
    "file_id": "{dataset}",
    "key_id": "no-such-key",
    "deployment_id": "no-such-deployment",
}
# Where an accepted body's stored form is read back, by route: the response's id key and the reading path.
READ_BACK = {
    ("POST", "/api/v1/models"): ("id", "/api/v1/models/{}"),
    ("PATCH", "/api/v1/models/{model_id}"): ("id", "/api/v1/models/{}"),
    ("POST", "/api/v1/methods"): ("id", "/api/v1/methods/{}"),
    ("POST", "/api/v1/uploads"): ("upload_id", "/api/v1/uploads/{}"),
    ("POST", "/api/v1/projects"): ("id", "/api/v1/projects?page_size=500"),
    ("POST", "/api/v1/keys"): ("id", "/api/v1/keys?page_size=500"),
    ("POST", "/api/v1/jobs"): ("id", "/api/v1/jobs/{}"),
    ("POST", "/api/v1/jobs/{job_id}/copy"): ("id", "/api/v1/jobs/{}"),
    ("POST", "/api/v1/jobs/{job_id}/publish"): ("model_id", "/api/v1/models/{}"),
    ("POST", "/v1/fine_tuning/jobs"): ("id", "/v1/fine_tuning/jobs/{}"),
    ("POST", "/api/v1/datasets"): ("id", "/api/v1/datasets/{}"),
    ("POST", "/v1/files"): ("id", "/v1/files/{}"),
}
# Query parameters a route needs whatever else it is asked.
QUERY_BASE = {"/api/v1/jobs/compare": "job_id=a&job_id=b&"}
MULTIPART_ROUTES = {"/api/v1/datasets": {}, "/v1/files": {"purpose": "fine-tune"}}
WRONG_TYPE_VALUES = {
    "string": 12345,
    "integer": "twelve",
    "number": "a lot",
    "boolean": "perhaps",
    "array": "not a list",
    "object": "not an object",
}


def resolve(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """A schema with its $ref followed and a nullable anyOf reduced to its non-null branch."""
    while True:
        if "$ref" in schema:
            schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in schema:
            options = [s for s in schema["anyOf"] if s.get("type") != "null"]
            if len(options) != 1:
                return schema
            schema = options[0]
        else:
            return schema


def string_fields(schema: dict[str, Any], document: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every place a string goes in a body: (dotted path, how: "value", "item" of a list, "map" value)."""
    for name, prop in (resolve(schema, document).get("properties") or {}).items():
        prop = resolve(prop, document)
        path = f"{prefix}{name}"
        kind = prop.get("type")
        if kind == "string" and prop.get("format") != "binary":
            yield path, "value"
        elif kind == "array" and resolve(prop.get("items", {}), document).get("type") == "string":
            yield path, "item"
        elif kind == "object" and prop.get("properties"):
            yield from string_fields(prop, document, f"{path}.")
        elif kind == "object" and (
            resolve(
                prop.get("additionalProperties") or {} if isinstance(prop.get("additionalProperties"), dict) else {},
                document,
            ).get("type")
            == "string"
            or any(p.get("type") == "string" for p in (prop.get("patternProperties") or {}).values())
        ):
            yield path, "map"


# Fields of which a body has exactly one: setting one drops the base body's other.
EXCLUSIVE = {"path", "uri", "hub_id"}


def put(body: dict[str, Any], path: str, how: str, value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    if path in EXCLUSIVE:
        body = {k: v for k, v in body.items() if k not in EXCLUSIVE}
    *parents, leaf = path.split(".")
    target = body
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = [value] if how == "item" else {"k": value} if how == "map" else value
    return body


# Routes whose violations name body fields under a prefix: a method's definition is the whole body.
FIELD_PREFIX = {"/api/v1/methods": "definition."}


def expected_field(path: str, how: str, template: str = "") -> str:
    return FIELD_PREFIX.get(template, "") + {"item": f"{path}.0", "map": f"{path}.k"}.get(how, path)


@dataclass
class Generated:
    """A generated case: refused naming `field`, or (accept_verbatim) stored with `payload` verbatim."""

    case: Case
    route: tuple[str, str]
    payload: str | None = None
    accept_verbatim: bool = False
    lenient: bool = False  # any 4xx in the API's shape will do (no field to name: an id with a NUL is no id)


def generated_cases(document: dict[str, Any], ids: dict[str, str]) -> list[Generated]:
    out: list[Generated] = []
    counter = iter(range(1_000_000))

    def path_of(template: str) -> str:
        for name, value in PATH_IDS.items():
            template = template.replace("{" + name + "}", _format_ids(value, ids))
        return template

    def base(route: tuple[str, str]) -> dict[str, Any]:
        n = next(counter)
        return _expand(json.loads(json.dumps(BASE_BODIES[route]).replace("{n}", str(n))), ids)

    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            method = method.upper()
            if method == "HEAD":  # no body to read an error from; GET covers the same route
                continue
            route = (method, template)
            content = operation.get("requestBody", {}).get("content", {})
            where = path_of(template)
            label = f"{method} {template}"
            if "application/json" in content:
                assert route in BASE_BODIES, f"no valid base body for {label}: add one to BASE_BODIES"
                schema = resolve(content["application/json"]["schema"], document)
                for field_path, how in string_fields(schema, document):
                    for payload in METACHARACTERS:
                        body = put(base(route), field_path, how, payload)
                        case = Case(
                            f"{label} {field_path}={payload!r}",
                            "metacharacters",
                            method,
                            where,
                            400,
                            expected_field(field_path, how, template),
                            json=body,
                        )
                        out.append(Generated(case, route, payload, accept_verbatim=True))
                    for payload in TRAVERSALS:
                        body = put(base(route), field_path, how, payload)
                        field = expected_field(field_path, how, template)
                        case = Case(
                            f"{label} {field_path}={payload!r}", "path_traversal", method, where, 400, field, json=body
                        )
                        out.append(Generated(case, route, payload, accept_verbatim="\0" not in payload))
                for name, prop in (schema.get("properties") or {}).items():
                    kind = resolve(prop, document).get("type")
                    if kind in WRONG_TYPE_VALUES:
                        body = base(route) | {name: WRONG_TYPE_VALUES[kind]}
                        field = expected_field(name, "value", template)
                        case = Case(
                            f"{label} {name} of the wrong type", "wrong_type", method, where, 400, field, json=body
                        )
                        out.append(Generated(case, route))
                deep = b"[" * 100_000 + b"]" * 100_000
                headers = {"content-type": "application/json"}
                out.append(
                    Generated(
                        Case(
                            f"{label} 100000 levels",
                            "deep_nesting",
                            method,
                            where,
                            400,
                            "body",
                            content=deep,
                            headers=headers,
                        ),
                        route,
                    )
                )
                bad = b'{"x": "\xff\xfe"}'
                out.append(
                    Generated(
                        Case(
                            f"{label} invalid UTF-8",
                            "invalid_utf8",
                            method,
                            where,
                            400,
                            "body",
                            content=bad,
                            headers=headers,
                        ),
                        route,
                    )
                )
            elif "multipart/form-data" in content:
                schema = resolve(content["multipart/form-data"]["schema"], document)
                fixed = MULTIPART_ROUTES[template]
                good = b'{"prompt": "a", "completion": "b"}\n'
                for field_path, _how in string_fields(schema, document):
                    if field_path == "file":  # the file itself: the corpus's files cover it
                        continue
                    for payload in [*METACHARACTERS, *TRAVERSALS]:
                        category = "path_traversal" if payload in TRAVERSALS else "metacharacters"
                        data = fixed | {field_path: payload}
                        case = Case(
                            f"{label} {field_path}={payload!r}",
                            category,
                            method,
                            where,
                            400,
                            field_path,
                            files={"file": ("d.jsonl", good)},
                            data=data,
                        )
                        out.append(Generated(case, route, payload, accept_verbatim="\0" not in payload))
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    # Every id in a path: traversal never reaches a file; an id with a NUL is no id (400 or 404).
                    for payload, status in (("..%2F..%2Fetc%2Fpasswd", 404), ("%2e%2e", 404), ("x%00y", 400)):
                        target = template.replace("{" + parameter["name"] + "}", payload)
                        for name, value in PATH_IDS.items():
                            target = target.replace("{" + name + "}", _format_ids(value, ids))
                        body = base(route) if route in BASE_BODIES else None
                        headers = {"content-range": "bytes 0-0/1"} if method == "PUT" else {}
                        case = Case(
                            f"{label} {parameter['name']}={payload}",
                            "path_traversal",
                            method,
                            target,
                            status,
                            None,
                            json=body,
                            headers=headers,
                            content=b"x" if method == "PUT" else None,
                        )
                        out.append(Generated(case, route, lenient=status == 400))
                elif parameter["in"] == "query":
                    kind = resolve(parameter.get("schema", {}), document)
                    kind = resolve(kind.get("items", kind), document).get("type")
                    name = parameter["name"]
                    if kind == "integer":
                        for payload, category in (
                            ("-1", "negative_step"),
                            ("18446744073709551616", "huge_value"),
                            ("1e308", "huge_value"),
                        ):
                            if (
                                payload == "-1"
                                and resolve(parameter.get("schema", {}), document).get("minimum", -1) < 0
                            ):
                                continue
                            out.append(
                                Generated(
                                    Case(
                                        f"{label} ?{name}={payload}",
                                        category,
                                        method,
                                        f"{where}?{QUERY_BASE.get(template, '')}{name}={payload}",
                                        400,
                                        name,
                                    ),
                                    route,
                                )
                            )
                    elif kind == "string":
                        for payload in METACHARACTERS:
                            query = urllib.parse.urlencode({name: payload})
                            out.append(
                                Generated(
                                    Case(
                                        f"{label} ?{name}={payload!r}",
                                        "metacharacters",
                                        method,
                                        f"{where}?{QUERY_BASE.get(template, '')}{query}",
                                        400,
                                        name,
                                    ),
                                    route,
                                    payload,
                                    accept_verbatim=True,
                                )
                            )
    return out


# -- judging -------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    by_category: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0
    crashes: int = 0
    partial_writes: int = 0
    verbatim: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def slowest(self, n: int = 5) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:n])

    def fail(self, case: Case, why: str) -> None:
        self.problems.append(f"{case.id} [{case.method} {case.path[:120]}]: {why}")


def names(fields: list[str], message: str, expected: str) -> bool:
    """The error names the field: as a field (or a field under it), or in its message when it has none."""
    fields = [re.sub(r"\[(\d+)\]", r".\1", f) for f in fields]  # tags[0] and tags.0 name one field
    expected = re.sub(r"\[(\d+)\]", r".\1", expected)
    return any(f == expected or f.startswith((f"{expected}.", f"{expected}[")) for f in fields) or (
        not fields and expected in message
    )


def contains(value: Any, payload: str) -> bool:
    if isinstance(value, str):
        return value == payload or payload in value
    if isinstance(value, dict):
        return any(contains(k, payload) or contains(v, payload) for k, v in value.items())
    if isinstance(value, list):
        return any(contains(v, payload) for v in value)
    return False


def judge(
    stack: Stack, tally: Tally, case: Case, generated: Generated | None = None, invalid_line: int | None = None
) -> None:
    tally.by_category[case.category] += 1
    before = stack.fingerprint()
    started = time.perf_counter()
    try:
        response = send(stack, case)
    except Exception as exc:  # the client saw no answer at all: the app raised through the server
        tally.crashes += 1
        tally.fail(case, f"no answer: {type(exc).__name__}: {exc}")
        return
    tally.seconds[case.id] = time.perf_counter() - started
    status = response.status_code
    tally.statuses[status] += 1
    if status >= 500:
        tally.server_errors += 1
        tally.fail(case, f"{status} {response.text[:300]}")
        return
    if status < 400:
        accepted(stack, tally, case, generated, invalid_line, response, before)
        return
    try:
        message, fields = error_of(case.path, response)
    except Exception:
        tally.fail(case, f"{status} without the API's error shape: {response.text[:300]}")
        return
    # A free-text value may be refused for what it says or for another reason (a 404 for an id it is not, a 409
    # for the resource's state): the answer needs the API's shape, and a 400 must name the field.
    free = generated is not None and (generated.accept_verbatim or generated.lenient or case.method == "GET")
    if not free and status != case.expect_status:
        tally.fail(case, f"{status} instead of {case.expect_status}: {response.text[:300]}")
    named = not (generated is not None and generated.lenient) and (not free or status == 400)
    if named and case.expect_field and not names(fields, message, case.expect_field):
        tally.fail(case, f"the error names {fields or message!r}, not {case.expect_field!r}")
    if case.expect_message and case.expect_message not in message:
        tally.fail(case, f"the message {message!r} does not say {case.expect_message!r}")
    if (after := stack.fingerprint()) != before:
        tally.partial_writes += 1
        tally.fail(case, f"refused with {status} but wrote: {changes(before, after)}")


def accepted(
    stack: Stack,
    tally: Tally,
    case: Case,
    generated: Generated | None,
    invalid_line: int | None,
    response: Any,
    before: dict,
) -> None:
    status = response.status_code
    if generated is not None and case.method in ("GET", "HEAD"):
        if (after := stack.fingerprint()) != before:  # a read never writes, whatever it was asked
            tally.partial_writes += 1
            tally.fail(case, f"a read wrote: {changes(before, after)}")
        return
    if generated is not None and generated.accept_verbatim and generated.payload is not None:
        # Free text holding metacharacters is valid: it must come back exactly as sent, from the store too.
        body = response.json()
        id_key, read_path = READ_BACK.get(generated.route, (None, None))
        stored = stack.client.get(read_path.format(body.get(id_key, ""))).json() if read_path else body
        problems = stored.get("validation", {}).get("problems", []) if isinstance(stored, dict) else []
        if contains(stored, generated.payload):
            tally.verbatim += 1
        elif stored.get("status") == "INVALID" and any(p.get("field") == case.expect_field for p in problems):
            pass  # a dataset option kept as INVALID with a problem naming it (a column the file does not have)
        else:
            tally.fail(case, f"accepted ({status}) but {generated.payload!r} was not stored verbatim: {dumps(stored)}")
        return
    if invalid_line is not None and status == case.expect_status:
        # A malformed file is kept as an INVALID dataset (so its owner can read what to fix), naming the line.
        dataset = response.json()
        stored = stack.client.get(f"/api/v1/datasets/{dataset['id']}").json()
        problems = stored.get("validation", {}).get("problems", [])
        if stored["status"] != "INVALID" or not any(p.get("line") == invalid_line for p in problems):
            tally.fail(case, f"not INVALID naming line {invalid_line}: {dumps(stored)}")
        return
    if status != case.expect_status:
        tally.fail(case, f"accepted with {status}: {response.text[:300]}")
    elif case.expect_empty is not None:
        # A filter holding SQL matches no row: it is compared as text, never run (nor taken as a LIKE pattern).
        if response.json()[case.expect_empty] != []:
            tally.fail(case, f"the filter matched rows: {response.text[:300]}")
    elif case.expect_preview is not None:
        # Rows with metacharacters are data: kept and shown back exactly as uploaded.
        preview = stack.client.get(f"/api/v1/datasets/{response.json()['id']}/preview").json()
        if contains(preview, case.expect_preview):
            tally.verbatim += 1
        else:
            tally.fail(case, f"the preview lacks {case.expect_preview!r}: {dumps(preview)}")


def changes(before: dict, after: dict) -> str:
    rows = {k: (before["rows"].get(k), v) for k, v in after["rows"].items() if before["rows"].get(k) != v}
    files = set(before["files"].items()) ^ set(after["files"].items())
    return f"rows {sorted(rows)} files {sorted(files)[:5]}"


def judge_grpc(stack: Stack, tally: Tally, raw: dict[str, Any]) -> None:
    expect = raw["expect"]
    case = Case(raw["id"], raw["category"], "gRPC", raw["grpc"]["call"], 0, expect.get("field"))
    tally.by_category[case.category] += 1
    before = stack.fingerprint()
    service, method, request = grpc_request(raw["grpc"], stack.ids)
    started = time.perf_counter()
    answer = stack.grpc_call(service, method, request)
    tally.seconds[case.id] = time.perf_counter() - started
    code, fields, message = grpc_error(answer)
    tally.statuses[f"grpc {code.name if code else 'OK'}"] += 1
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
        tally.server_errors += 1
    if expect["code"] == "OK":
        if code is not None:
            tally.fail(case, f"{code.name} {message}")
        elif (line := expect.get("invalid_line")) is not None:
            dataset = answer.dataset
            report = json.loads(dataset.validation_json) if hasattr(dataset, "validation_json") else None
            got = stack.client.get(f"/api/v1/datasets/{dataset.id}").json()
            problems = got.get("validation", {}).get("problems", [])
            if got["status"] != "INVALID" or not any(p.get("line") == line for p in problems):
                tally.fail(case, f"not INVALID naming line {line}: {dumps(got)} {report}")
        return
    if code is None or code.name != expect["code"]:
        tally.fail(case, f"{code.name if code else 'OK'} instead of {expect['code']}: {message}")
        return
    if case.expect_field and not names(fields, message, case.expect_field):
        tally.fail(case, f"the violations name {fields or message!r}, not {case.expect_field!r}")
    if (after := stack.fingerprint()) != before:
        tally.partial_writes += 1
        tally.fail(case, f"refused but wrote: {changes(before, after)}")


def record(figures: Any, tally: Tally, what: str) -> None:
    total = sum(tally.by_category.values())
    figures.record(f"{what}: cases", total, "cases", goal=">= 200" if what == "corpus" else "")
    for category, count in sorted(tally.by_category.items()):
        figures.record(f"{what}: {category} cases", count, "cases")
    figures.record(
        f"{what}: 4xx answers",
        sum(n for s, n in tally.statuses.items() if isinstance(s, int) and 400 <= s < 500),
        "answers",
    )
    figures.record(f"{what}: 5xx answers", tally.server_errors, "answers", goal="0")
    figures.record(f"{what}: crashes", tally.crashes, "crashes", goal="0")
    figures.record(f"{what}: partial writes", tally.partial_writes, "writes", goal="0")
    figures.record(f"{what}: accepted-verbatim round trips", tally.verbatim, "round trips")


# -- the tests -----------------------------------------------------------------------------------------------------


def test_the_corpus_has_200_cases_over_every_category_of_bad_input():
    raw = yaml.safe_load((HERE / "cases.yaml").read_text())["cases"]
    assert len(raw) >= 200
    assert len({c["id"] for c in raw}) == len(raw), "case ids are unique"
    assert {c["category"] for c in raw} == set(CATEGORIES)
    for c in raw:
        assert c["category"] in CATEGORIES, c["id"]
        assert ("grpc" in c) == ("code" in c["expect"]), c["id"]


def test_every_corpus_case_is_a_4xx_naming_its_field_and_writes_nothing(
    postgres_url, second_postgres_url, tmp_path, figures
):
    tally = Tally()
    with bad_input_stack(postgres_url, second_postgres_url, tmp_path) as stack:
        raws = yaml.safe_load((HERE / "cases.yaml").read_text())["cases"]
        cases = {c.id: c for c in load_cases(stack.ids)}
        for raw in raws:
            if "grpc" in raw:
                judge_grpc(stack, tally, raw)
            else:
                judge(stack, tally, cases[raw["id"]], invalid_line=raw["expect"].get("invalid_line"))
        assert stack.answers(), "the services stopped answering"
    print("slowest:", tally.slowest(10))
    record(figures, tally, "corpus")
    assert not tally.problems, f"{len(tally.problems)} cases failed:\n" + "\n".join(tally.problems)


def test_every_string_field_and_parameter_of_the_openapi_document_takes_bad_input_without_harm(
    postgres_url, second_postgres_url, tmp_path, figures
):
    tally = Tally()
    with bad_input_stack(postgres_url, second_postgres_url, tmp_path) as stack:
        document = stack.client.get("/openapi.json").json()
        generated = generated_cases(document, stack.ids)
        for one in generated:
            judge(stack, tally, one.case, one)
        assert stack.answers(), "the services stopped answering"
    print("slowest:", tally.slowest(10))
    record(figures, tally, "generated")
    routes = {(g.case.method, g.route[1]) for g in generated}
    # Every route that takes a body, a path id or a query got cases (the document's own list, so new ones do too).
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            if method != "head" and (operation.get("parameters") or operation.get("requestBody")):
                assert (method.upper(), template) in routes, f"{method} {template} got no case"
    assert not tally.problems, f"{len(tally.problems)} cases failed:\n" + "\n".join(tally.problems)
