"""CatalogService over a real in-process grpc.aio server (port 0), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import update

from tests.helpers import CHAT_ROW, chat_jsonl, write_fake_model_dir
from tuneforge.catalog.v1 import catalog_pb2 as pb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2
from tuneforge_catalog import api, store
from tuneforge_catalog.main import CatalogSettings, build_catalog
from tuneforge_common import auth
from tuneforge_common.auth import Principal, Role
from tuneforge_common.db import utcnow
from tuneforge_common.errors import InvalidArgument
from tuneforge_common.grpcutil import decode_error, start_server

READY, INVALID = common_pb2.DATASET_STATUS_READY, common_pb2.DATASET_STATUS_INVALID


@dataclass
class JobsInUse:
    """The jobs port with answers set by the test; the real client is covered in tests/integration."""

    using: dict[str, int] = field(default_factory=dict)

    async def active_jobs_using(self, *, model_id: str = "", dataset_id: str = "") -> int:
        return self.using.get(model_id or dataset_id, 0)


@pytest.fixture
async def catalog_stub(database_url, tmp_path) -> AsyncIterator[catalog_pb2_grpc.CatalogServiceStub]:
    model_dir = write_fake_model_dir(tmp_path / "models" / "tiny-test", params=100)
    settings = CatalogSettings(
        catalog_database_url=database_url,
        artifact_root=str(tmp_path / "artifacts"),
        catalog_max_dataset_bytes=64 * 1024,
        catalog_seed_models=str(model_dir),
    )
    catalog, _publisher = await build_catalog(settings)
    catalog.jobs = JobsInUse()
    server, port = await start_server([api.binding(catalog)], "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    stub.health = health_pb2_grpc.HealthStub(channel)
    stub.catalog = catalog
    yield stub
    await channel.close()
    await server.stop(None)
    await catalog.close()
    await catalog.engine.dispose()


async def upload(stub, name: str, *chunks: bytes, **metadata) -> common_pb2.Dataset:
    async def requests():
        yield pb.UploadDatasetRequest(metadata=pb.DatasetUploadMetadata(name=name, **metadata))
        for chunk in chunks:
            yield pb.UploadDatasetRequest(chunk=chunk)

    return (await stub.UploadDataset(requests(), timeout=20)).dataset


async def rpc_error(call, request) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call(request, timeout=10)
    err = decode_error(exc.value)
    return err.code, exc.value.details() or "", err.field_violations


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


async def test_health_and_reflection_are_served(catalog_stub):
    resp = await catalog_stub.health.Check(
        health_pb2.HealthCheckRequest(service="tuneforge.catalog.v1.CatalogService"), timeout=5
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# -- models -------------------------------------------------------------------------------------------------


async def test_seeded_model_is_inspected_without_loading_it(catalog_stub):
    models = (await catalog_stub.ListModels(pb.ListModelsRequest(), timeout=5)).models
    assert [m.id for m in models] == ["tiny-test"]
    m = models[0]
    assert (m.architecture, m.parameter_count, m.context_length, m.has_chat_template, m.kind) == (
        "LlamaForCausalLM",
        100,
        2048,
        True,
        common_pb2.MODEL_KIND_BASE,
    )
    assert m.size_bytes > 400 and m.builtin


async def test_register_model_from_a_directory_records_what_it_inspected(catalog_stub, tmp_path):
    path = write_fake_model_dir(tmp_path / "mine", params=2000, chat_template=False)
    model = (
        await catalog_stub.RegisterModel(
            pb.RegisterModelRequest(
                path=str(path), name="mine", description="d", tags=["chat", "small", "chat"], license="apache-2.0"
            ),
            timeout=5,
        )
    ).model
    assert (model.parameter_count, model.has_chat_template, model.dtype, model.license) == (
        2000,
        False,
        "float32",
        "apache-2.0",
    )
    assert list(model.tags) == ["chat", "small"]  # duplicates dropped, order kept
    assert model.size_bytes == sum(f.stat().st_size for f in path.iterdir())
    assert model.source == str(path) and not model.builtin


@pytest.mark.parametrize(
    "breakage,reason",
    [
        ("config.json", "has no config.json"),
        ("tokenizer.json", "has no tokenizer"),
        ("model.safetensors", "has no weights"),
    ],
)
async def test_a_directory_that_is_not_a_loadable_model_is_refused_with_the_reason(
    catalog_stub, tmp_path, breakage, reason
):
    path = write_fake_model_dir(tmp_path / "broken")
    (path / breakage).unlink()
    code, _, violations = await rpc_error(
        catalog_stub.RegisterModel, pb.RegisterModelRequest(path=str(path), name="broken")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert violations[0][0] == "path" and reason in violations[0][1]
    assert len((await catalog_stub.ListModels(pb.ListModelsRequest(), timeout=5)).models) == 1


async def test_register_from_a_uri_inside_the_artifact_store_records_its_path(catalog_stub, tmp_path):
    path = write_fake_model_dir(tmp_path / "artifacts" / "uploaded-models" / "m")
    model = (
        await catalog_stub.RegisterModel(pb.RegisterModelRequest(uri=f"file://{path}", name="in-store"), timeout=10)
    ).model
    assert (model.uri, model.source, model.parameter_count) == (str(path), f"file://{path}", 64)


@pytest.mark.parametrize(
    "uri,reason",
    [
        ("file:///etc", "must be inside the artifact store"),
        ("memory://bucket/model", "must be inside the artifact store"),
        ("nosuchscheme://x/y", "unsupported URI"),
    ],
)
async def test_a_uri_outside_the_artifact_store_or_of_an_unknown_scheme_is_refused(catalog_stub, uri, reason):
    code, _, violations = await rpc_error(catalog_stub.RegisterModel, pb.RegisterModelRequest(uri=uri, name="x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "uri" and reason in violations[0][1]


async def test_a_remote_stores_model_is_inspected_from_a_scratch_copy_that_is_then_removed(catalog_stub, tmp_path):
    import fsspec

    from tuneforge_common.artifacts import ArtifactStore

    catalog_stub.catalog.artifacts = store_ = ArtifactStore("memory://tf-remote-store")
    mem = fsspec.filesystem("memory")
    for f in write_fake_model_dir(tmp_path / "remote").iterdir():
        mem.pipe(f"/tf-remote-store/models/remote/{f.name}", f.read_bytes())
    mem.pipe("/tf-remote-store/models/not-a-model/readme.txt", b"hello")
    model = (
        await catalog_stub.RegisterModel(pb.RegisterModelRequest(uri=store_.uri("models", "remote"), name="r"))
    ).model
    assert (model.uri, model.parameter_count) == ("memory://tf-remote-store/models/remote", 64)
    code, _, violations = await rpc_error(
        catalog_stub.RegisterModel, pb.RegisterModelRequest(uri=store_.uri("models", "not-a-model"), name="n")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "has no config.json" in violations[0][1]
    assert not [name for name in os.listdir(store_.scratch_dir()) if name.startswith("inspect-")]


async def test_register_by_hub_id_without_internet_is_a_clear_unavailable(catalog_stub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, details, _ = await rpc_error(
        catalog_stub.RegisterModel, pb.RegisterModelRequest(hub_id="Qwen/Qwen2.5-0.5B", name="qwen")
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "could not fetch 'Qwen/Qwen2.5-0.5B'" in details and "register its directory with `path`" in details


async def test_a_malformed_hub_id_is_invalid_argument(catalog_stub):
    code, _, violations = await rpc_error(
        catalog_stub.RegisterModel, pb.RegisterModelRequest(hub_id="not a//valid id", name="h")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "hub_id"


async def test_renamed_builtin_model_is_still_found_at_the_next_start(catalog_stub, database_url, tmp_path):
    await catalog_stub.UpdateModel(
        pb.UpdateModelRequest(
            model_id="tiny-test",
            model=common_pb2.Model(name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )
    restarted, _ = await build_catalog(
        CatalogSettings(
            catalog_database_url=database_url,
            artifact_root=str(tmp_path / "artifacts"),
            catalog_seed_models=str(tmp_path / "models" / "tiny-test"),
        )
    )
    try:
        assert (await restarted.get_model("tiny-test")).name == "renamed"
    finally:
        await restarted.close()
        await restarted.engine.dispose()


async def test_overlong_license_is_invalid_argument(catalog_stub, tmp_path):
    path = write_fake_model_dir(tmp_path / "m")
    code, _, violations = await rpc_error(
        catalog_stub.RegisterModel, pb.RegisterModelRequest(path=str(path), name="m", license="x" * 300)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "license"


async def test_register_model_needs_a_source_and_a_unique_name(catalog_stub, tmp_path):
    code, _, violations = await rpc_error(catalog_stub.RegisterModel, pb.RegisterModelRequest(name="x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "source"
    path = write_fake_model_dir(tmp_path / "m")
    code, _, _ = await rpc_error(catalog_stub.RegisterModel, pb.RegisterModelRequest(path=str(path), name="tiny-test"))
    assert code == grpc.StatusCode.ALREADY_EXISTS


async def test_list_models_filters_by_kind_tag_and_name_and_pages(catalog_stub, tmp_path):
    for i, tags in enumerate([["chat"], ["chatty"], ["chat", "code"]]):
        path = write_fake_model_dir(tmp_path / f"m{i}")
        await catalog_stub.RegisterModel(pb.RegisterModelRequest(path=str(path), name=f"Llama-{i}", tags=tags))

    async def names(**kw) -> list[str]:
        return [m.name for m in (await catalog_stub.ListModels(pb.ListModelsRequest(**kw), timeout=5)).models]

    assert await names(tag="chat") == ["Llama-0", "Llama-2"]  # "chatty" is another tag
    assert await names(name_contains="LLAMA") == ["Llama-0", "Llama-1", "Llama-2"]
    assert await names(kind=common_pb2.MODEL_KIND_CUSTOMIZED) == []
    assert len(await names(kind=common_pb2.MODEL_KIND_BASE)) == 4
    page1 = await catalog_stub.ListModels(pb.ListModelsRequest(page_size=3), timeout=5)
    page2 = await catalog_stub.ListModels(pb.ListModelsRequest(page_size=3, page_token=page1.next_page_token))
    assert len(page1.models) == 3 and len(page2.models) == 1 and not page2.next_page_token


async def test_update_model_changes_only_the_masked_fields(catalog_stub, tmp_path):
    path = write_fake_model_dir(tmp_path / "m")
    model = (await catalog_stub.RegisterModel(pb.RegisterModelRequest(path=str(path), name="m", license="mit"))).model
    updated = (
        await catalog_stub.UpdateModel(
            pb.UpdateModelRequest(
                model_id=model.id,
                model=common_pb2.Model(name="renamed", tags=["x"], license="ignored"),
                update_mask=field_mask_pb2.FieldMask(paths=["name", "tags"]),
            ),
            timeout=5,
        )
    ).model
    assert (updated.name, list(updated.tags), updated.license) == ("renamed", ["x"], "mit")
    assert updated.update_time.ToDatetime() >= model.update_time.ToDatetime()
    code, details, _ = await rpc_error(
        catalog_stub.UpdateModel,
        pb.UpdateModelRequest(model_id=model.id, update_mask=field_mask_pb2.FieldMask(paths=["uri"])),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "can't update uri" in details
    code, _, _ = await rpc_error(
        catalog_stub.UpdateModel,
        pb.UpdateModelRequest(
            model_id=model.id,
            model=common_pb2.Model(name="tiny-test"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS


async def test_delete_model_is_refused_while_a_job_or_published_model_depends_on_it(catalog_stub, tmp_path):
    path = write_fake_model_dir(tmp_path / "m")
    model = (await catalog_stub.RegisterModel(pb.RegisterModelRequest(path=str(path), name="m"))).model
    catalog_stub.catalog.jobs.using[model.id] = 2
    code, details, _ = await rpc_error(catalog_stub.DeleteModel, pb.DeleteModelRequest(model_id=model.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "used by 2 unfinished job(s)" in details
    catalog_stub.catalog.jobs.using.clear()
    async with catalog_stub.catalog.engine.begin() as conn:  # a published adapter on top of it
        await conn.execute(
            store.models.insert().values(
                id="pub1", name="pub", description="", uri="/x", architecture="", parameter_count=0,
                context_length=0, dtype="", has_chat_template=False, builtin=False, created_at=utcnow(),
                updated_at=utcnow(), tags="[]", license="", size_bytes=0, kind="CUSTOMIZED", source="",
                lineage=json.dumps({"base_model_id": model.id, "job_id": "job1", "checkpoint_step": 20}),
                base_model_id=model.id,
            )
        )  # fmt: skip
    code, details, _ = await rpc_error(catalog_stub.DeleteModel, pb.DeleteModelRequest(model_id=model.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "base of 1 published model" in details
    published = (await catalog_stub.GetModel(pb.GetModelRequest(model_id="pub1"))).model
    assert published.kind == common_pb2.MODEL_KIND_CUSTOMIZED and published.lineage.checkpoint_step == 20
    await catalog_stub.DeleteModel(pb.DeleteModelRequest(model_id="pub1"), timeout=5)
    await catalog_stub.DeleteModel(pb.DeleteModelRequest(model_id=model.id), timeout=5)
    code, _, _ = await rpc_error(catalog_stub.GetModel, pb.GetModelRequest(model_id=model.id))
    assert code == grpc.StatusCode.NOT_FOUND


def write_adapter_dir(path, params: int = 32):
    import struct as struct_

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-test", "r": 8}))
    header = json.dumps({"a": {"dtype": "F32", "shape": [params], "data_offsets": [0, 4 * params]}}).encode()
    (path / "adapter_model.safetensors").write_bytes(struct_.pack("<Q", len(header)) + header + b"\0" * (4 * params))
    return path


async def test_a_published_adapter_is_a_customized_model_with_lineage_that_pins_its_base(catalog_stub, tmp_path):
    adapter = write_adapter_dir(tmp_path / "artifacts" / "jobs" / "job1" / "checkpoints" / "checkpoint-20")
    lineage = common_pb2.ModelLineage(
        base_model_id="tiny-test", job_id="job1", checkpoint_step=20, method_id="sft-lora", dataset_id="ds1"
    )
    model = (
        await catalog_stub.PublishModel(
            pb.PublishModelRequest(name="support-v1", uri=str(adapter), lineage=lineage), timeout=10
        )
    ).model
    assert (model.kind, model.parameter_count, model.architecture, model.lineage.checkpoint_step) == (
        common_pb2.MODEL_KIND_CUSTOMIZED,
        32,
        "LlamaForCausalLM",
        20,
    )
    assert model.source == "job job1 step 20"
    listed = await catalog_stub.ListModels(pb.ListModelsRequest(kind=common_pb2.MODEL_KIND_CUSTOMIZED))
    assert [m.name for m in listed.models] == ["support-v1"]
    code, details, _ = await rpc_error(
        catalog_stub.PublishModel,
        pb.PublishModelRequest(name="outside", uri=str(tmp_path / "elsewhere"), lineage=lineage),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "artifact store" in details
    code, _, _ = await rpc_error(
        catalog_stub.PublishModel,
        pb.PublishModelRequest(name="x", uri=str(adapter), lineage=common_pb2.ModelLineage(base_model_id="nope")),
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_builtin_model_cannot_be_deleted(catalog_stub):
    code, _, _ = await rpc_error(catalog_stub.DeleteModel, pb.DeleteModelRequest(model_id="tiny-test"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


# -- datasets -----------------------------------------------------------------------------------------------


async def test_upload_in_chunks_validates_and_dedups_content(catalog_stub, tmp_path):
    data = chat_jsonl(5)
    first = await upload(catalog_stub, "a", data[:7], data[7:])
    second = await upload(catalog_stub, "b", data)
    assert (first.status, first.row_count, first.format, list(first.columns)) == (
        READY,
        5,
        common_pb2.DATASET_FORMAT_CHAT,
        ["messages"],
    )
    assert first.sha256 == second.sha256 == hashlib.sha256(data).hexdigest()
    assert first.uri == second.uri  # same bytes, one stored copy
    assert len(list((tmp_path / "artifacts" / "datasets" / "sha256").iterdir())) == 1


async def test_concurrent_uploads_of_the_same_bytes_all_succeed_with_one_stored_copy(catalog_stub, tmp_path):
    import asyncio

    data = chat_jsonl(200)
    uploaded = await asyncio.gather(*(upload(catalog_stub, f"same-{i}", data) for i in range(4)))
    assert {d.status for d in uploaded} == {READY} and len({d.uri for d in uploaded}) == 1
    assert [p.name for p in (tmp_path / "artifacts" / "datasets" / "sha256").iterdir()] == [
        f"{uploaded[0].sha256}.jsonl"
    ]


async def test_deleting_while_the_same_bytes_are_uploaded_keeps_the_new_datasets_content(catalog_stub, tmp_path):
    import asyncio

    data = chat_jsonl(50)
    for attempt in range(5):
        old = await upload(catalog_stub, f"old-{attempt}", data)
        _, new = await asyncio.gather(
            catalog_stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=old.id), timeout=10),
            upload(catalog_stub, f"new-{attempt}", data),
        )
        chunks = [m.chunk async for m in catalog_stub.DownloadDataset(pb.DownloadDatasetRequest(dataset_id=new.id))]
        assert b"".join(chunks) == data
        await catalog_stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=new.id), timeout=10)
    assert not list((tmp_path / "artifacts" / "datasets" / "sha256").iterdir())  # the last delete freed it


async def test_bad_jsonl_is_stored_invalid_with_every_problem_by_line(catalog_stub):
    data = chat_jsonl(2) + b"{oops\n" + jsonl({"messages": [{"role": "bot", "content": "x"}]}, b"[1]")
    dataset = await upload(catalog_stub, "bad", data)
    assert dataset.status == INVALID and dataset.validation.problem_count == 4
    assert [(p.line, p.field, p.message) for p in dataset.validation.problems] == [
        (3, "", "not valid JSON: Expecting property name enclosed in double quotes at column 2"),
        (4, "messages[0].role", 'must be one of system, user, assistant, tool, got "bot"'),
        (4, "messages", "has no assistant turn to learn from"),
        (5, "", "must be a JSON object, got array"),
    ]
    listed = (await catalog_stub.ListDatasets(pb.ListDatasetsRequest(status=INVALID), timeout=5)).datasets
    assert [d.id for d in listed] == [dataset.id]
    # Lists stay small: the count, not the problems, which GetDataset gives.
    assert (listed[0].validation.problem_count, list(listed[0].validation.problems)) == (4, [])
    got = (await catalog_stub.GetDataset(pb.GetDatasetRequest(dataset_id=dataset.id))).dataset
    assert len(got.validation.problems) == 4


async def test_declared_format_and_column_mapping_are_validated(catalog_stub):
    rows = jsonl({"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": ""})
    dataset = await upload(
        catalog_stub,
        "qa",
        rows,
        format=common_pb2.DATASET_FORMAT_COLUMNS,
        prompt_input_column="q",
        prompt_output_column="a",
    )
    assert dataset.status == INVALID
    assert [(p.line, p.field, p.message) for p in dataset.validation.problems] == [(2, "a", "is empty")]
    detected = await upload(catalog_stub, "qa2", jsonl({"question": "2+2?", "answer": "4"}))
    assert (detected.status, detected.format, detected.prompt_input_column, detected.prompt_output_column) == (
        READY,
        common_pb2.DATASET_FORMAT_COLUMNS,
        "question",
        "answer",
    )
    declared = await upload(catalog_stub, "pref", jsonl(CHAT_ROW), format=common_pb2.DATASET_FORMAT_PREFERENCE)
    assert declared.status == INVALID and declared.validation.problems[0].field == "chosen"


async def test_upload_over_the_limit_is_resource_exhausted_and_nothing_is_stored(catalog_stub, tmp_path):
    code, details, _ = await rpc_error(
        lambda req, timeout: upload(catalog_stub, "big", b"x" * 40_000, b"x" * 40_000), None
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "65536 bytes" in details
    assert (await catalog_stub.ListDatasets(pb.ListDatasetsRequest(), timeout=5)).datasets == []
    assert not (tmp_path / "artifacts" / "datasets").exists()


async def test_upload_larger_than_the_grpc_message_limit_streams_in_chunks(catalog_stub):
    catalog_stub.catalog.max_dataset_bytes = 16 * 1024 * 1024
    row = json.dumps(CHAT_ROW).encode() + b"\n"
    data = row * (6 * 1024 * 1024 // len(row))  # 6 MiB > the 4 MiB default message limit
    dataset = await upload(catalog_stub, "six-mib", *(data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)))
    assert dataset.status == READY and dataset.size_bytes == len(data)


async def test_list_datasets_pages_and_filters_by_format_and_name(catalog_stub):
    for i in range(3):
        await upload(catalog_stub, f"d{i}", chat_jsonl(1 + i))
    await upload(catalog_stub, "texts", jsonl({"text": "hello"}))
    page1 = await catalog_stub.ListDatasets(pb.ListDatasetsRequest(page_size=2), timeout=5)
    page2 = await catalog_stub.ListDatasets(pb.ListDatasetsRequest(page_size=2, page_token=page1.next_page_token))
    assert [d.name for d in page1.datasets] + [d.name for d in page2.datasets] == ["d0", "d1", "d2", "texts"]
    assert page2.next_page_token == ""
    texts = await catalog_stub.ListDatasets(pb.ListDatasetsRequest(format=common_pb2.DATASET_FORMAT_TEXT))
    assert [d.name for d in texts.datasets] == ["texts"]
    assert [d.name for d in (await catalog_stub.ListDatasets(pb.ListDatasetsRequest(name_contains="D1"))).datasets] == [
        "d1"
    ]
    code, _, _ = await rpc_error(catalog_stub.ListDatasets, pb.ListDatasetsRequest(page_token="garbage!"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def datasets_created_at(catalog_stub, created: dict[str, dt.datetime]) -> None:
    async with catalog_stub.catalog.engine.begin() as conn:
        for dataset_id, when in created.items():
            await conn.execute(update(store.datasets).where(store.datasets.c.id == dataset_id).values(created_at=when))


async def every_dataset(catalog_stub, page_size: int, **request) -> list[str]:
    ids, token = [], ""
    while True:
        resp = await catalog_stub.ListDatasets(
            pb.ListDatasetsRequest(page_size=page_size, page_token=token, **request), timeout=5
        )
        assert len(resp.datasets) == page_size if resp.next_page_token else len(resp.datasets) <= page_size
        ids += [d.id for d in resp.datasets]
        token = resp.next_page_token
        if not token:
            return ids


async def test_list_datasets_newest_first_and_after_a_dataset_in_either_order(catalog_stub):
    ids = [(await upload(catalog_stub, f"d{i}", chat_jsonl(1 + i))).id for i in range(6)]
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    # Two pairs share their created_at exactly: id breaks the tie, ascending in both orders (as the jobs list does).
    created = dict(zip(ids, [t0, t0 + dt.timedelta(seconds=5), t0 + dt.timedelta(seconds=1), t0, t0, t0], strict=True))
    created[ids[3]] = created[ids[4]] = t0 + dt.timedelta(seconds=3)
    await datasets_created_at(catalog_stub, created)
    tie = sorted([ids[3], ids[4]])
    oldest_first = sorted([ids[0], ids[5]]) + [ids[2], *tie, ids[1]]
    newest_first = [ids[1], *tie, ids[2], *sorted([ids[0], ids[5]])]

    for page_size in (1, 2, 4, 100):
        assert await every_dataset(catalog_stub, page_size) == oldest_first
        assert await every_dataset(catalog_stub, page_size, newest_first=True) == newest_first
    for i, dataset_id in enumerate(oldest_first):
        assert await every_dataset(catalog_stub, 2, after_dataset_id=dataset_id) == oldest_first[i + 1 :]
    for i, dataset_id in enumerate(newest_first):
        got = await every_dataset(catalog_stub, 2, newest_first=True, after_dataset_id=dataset_id)
        assert got == newest_first[i + 1 :], dataset_id
    # The cursor combines with the filters.
    named = await catalog_stub.ListDatasets(
        pb.ListDatasetsRequest(newest_first=True, after_dataset_id=ids[1], name_contains="d2"), timeout=5
    )
    assert [d.id for d in named.datasets] == [ids[2]]

    code, _, violations = await rpc_error(catalog_stub.ListDatasets, pb.ListDatasetsRequest(after_dataset_id="ds-nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations] == ["after_dataset_id"]


async def test_after_another_projects_dataset_is_refused_as_a_missing_one(catalog_stub):
    mine, theirs = [(await upload(catalog_stub, name, chat_jsonl(n))).id for n, name in ((1, "mine"), (2, "theirs"))]
    async with catalog_stub.catalog.engine.begin() as conn:
        for dataset_id, project in ((mine, "alpha"), (theirs, "beta")):
            d = store.datasets.c
            await conn.execute(update(store.datasets).where(d.id == dataset_id).values(project_id=project))

    async def list_as_alpha(after: str) -> list[str]:
        auth.act_as(Principal(kind="user", roles={"alpha": Role.VIEWER}, project="alpha"))
        rows, _ = await catalog_stub.catalog.list_datasets(0, "", "", "", "", newest_first=True, after_dataset_id=after)
        return [r.id for r in rows]

    shared = (await upload(catalog_stub, "shared", chat_jsonl(3))).id  # no project: every project sees it
    assert await asyncio.create_task(list_as_alpha(shared)) == [mine]
    with pytest.raises(InvalidArgument) as refused:
        await asyncio.create_task(list_as_alpha(theirs))
    assert refused.value.violations[0].field == "after_dataset_id"
    assert refused.value.violations[0].description == f"no dataset {theirs!r} to list after"  # nothing of beta's


async def test_preview_and_download_return_the_stored_rows_and_bytes(catalog_stub):
    data = b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(30))
    dataset = await upload(catalog_stub, "t", data)
    preview = await catalog_stub.PreviewDataset(pb.PreviewDatasetRequest(dataset_id=dataset.id, limit=3))
    assert [dict(r) for r in preview.rows] == [{"text": "row 0"}, {"text": "row 1"}, {"text": "row 2"}]
    default = await catalog_stub.PreviewDataset(pb.PreviewDatasetRequest(dataset_id=dataset.id))
    assert len(default.rows) == 10
    chunks = [m.chunk async for m in catalog_stub.DownloadDataset(pb.DownloadDatasetRequest(dataset_id=dataset.id))]
    assert b"".join(chunks) == data
    code, _, violations = await rpc_error(
        catalog_stub.PreviewDataset, pb.PreviewDatasetRequest(dataset_id=dataset.id, limit=500)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "limit"


async def test_stats_count_tokens_with_the_models_tokenizer(catalog_stub):
    # The test tokenizer makes one token per whitespace-separated word.
    data = jsonl(*({"prompt": " ".join(["w"] * n), "completion": "done"} for n in (1, 3, 5, 7, 9)))
    dataset = await upload(catalog_stub, "pc", data)
    stats = await catalog_stub.GetDatasetStats(
        pb.GetDatasetStatsRequest(dataset_id=dataset.id, model_id="tiny-test", max_seq_length=6), timeout=10
    )
    assert (stats.row_count, stats.min_tokens, stats.max_tokens, stats.total_tokens) == (5, 2, 10, 30)
    assert (stats.mean_tokens, stats.p50_tokens, stats.p95_tokens, stats.rows_truncated) == (6.0, 6, 10, 2)


async def test_invalid_dataset_has_no_stats_and_cannot_be_split(catalog_stub):
    dataset = await upload(catalog_stub, "bad", b"{oops\n")
    for call, request in [
        (catalog_stub.GetDatasetStats, pb.GetDatasetStatsRequest(dataset_id=dataset.id, model_id="tiny-test")),
        (catalog_stub.SplitDataset, pb.SplitDatasetRequest(dataset_id=dataset.id, validation_ratio=0.2)),
    ]:
        code, details, _ = await rpc_error(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "INVALID, not READY" in details


async def test_split_is_reproducible_by_seed_and_partitions_the_rows(catalog_stub):
    data = b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(50))
    dataset = await upload(catalog_stub, "t", data)

    async def split(seed: int) -> tuple[common_pb2.Dataset, common_pb2.Dataset]:
        resp = await catalog_stub.SplitDataset(
            pb.SplitDatasetRequest(dataset_id=dataset.id, validation_ratio=0.2, seed=seed), timeout=10
        )
        return resp.train, resp.validation

    train, val = await split(7)
    again_train, again_val = await split(7)
    _, other_val = await split(8)
    assert (train.row_count, val.row_count) == (40, 10)
    assert (train.status, train.parent_dataset_id, val.name) == (READY, dataset.id, "t-validation")
    assert (again_train.sha256, again_val.sha256) == (train.sha256, val.sha256)
    assert other_val.sha256 != val.sha256

    async def rows(ds) -> set[bytes]:
        stream = catalog_stub.DownloadDataset(pb.DownloadDatasetRequest(dataset_id=ds.id))
        return set(b"".join([m.chunk async for m in stream]).splitlines())

    train_rows, val_rows = await rows(train), await rows(val)
    assert not train_rows & val_rows and train_rows | val_rows == set(data.splitlines())
    code, _, violations = await rpc_error(
        catalog_stub.SplitDataset, pb.SplitDatasetRequest(dataset_id=dataset.id, validation_ratio=0.9)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "validation_ratio"


async def test_delete_dataset_is_refused_while_a_job_uses_it_and_keeps_shared_content(catalog_stub, tmp_path):
    data = chat_jsonl(2)
    kept, dropped = await upload(catalog_stub, "kept", data), await upload(catalog_stub, "dropped", data)
    catalog_stub.catalog.jobs.using[dropped.id] = 1
    code, details, _ = await rpc_error(catalog_stub.DeleteDataset, pb.DeleteDatasetRequest(dataset_id=dropped.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "used by 1 unfinished job(s)" in details
    catalog_stub.catalog.jobs.using.clear()
    await catalog_stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=dropped.id), timeout=5)
    stored = tmp_path / "artifacts" / "datasets" / "sha256" / f"{kept.sha256}.jsonl"
    assert stored.exists()  # the other dataset with the same bytes still needs them
    await catalog_stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=kept.id), timeout=5)
    assert not stored.exists()
    code, _, _ = await rpc_error(catalog_stub.GetDataset, pb.GetDatasetRequest(dataset_id=kept.id))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_a_dataset_left_validating_by_a_dead_process_is_validated_at_start(catalog_stub, database_url, tmp_path):
    catalog = catalog_stub.catalog
    catalog.validation_wait_seconds = 0  # answer before validating, as a crash right after storing would leave it
    validate, catalog.validate_dataset = catalog.validate_dataset, _never_finishes
    dataset = await upload(catalog_stub, "pending", chat_jsonl(3))
    assert dataset.status == common_pb2.DATASET_STATUS_VALIDATING
    catalog.validate_dataset = validate
    restarted, _ = await build_catalog(
        CatalogSettings(catalog_database_url=database_url, artifact_root=str(tmp_path / "artifacts"))
    )
    try:
        await _drain(restarted)
        row = await restarted.get_dataset(dataset.id)
        assert (row.status, row.row_count) == ("READY", 3)
    finally:
        await restarted.close()
        await restarted.engine.dispose()


async def _never_finishes(dataset_id: str) -> None:
    import asyncio

    await asyncio.Event().wait()


async def _drain(catalog) -> None:
    import asyncio

    await asyncio.gather(*list(catalog._background))


async def test_scratch_files_a_dead_process_left_are_removed_and_fresh_ones_kept(catalog_stub):
    catalog = catalog_stub.catalog
    scratch = catalog.artifacts.scratch_dir()
    old_file, fresh_file, old_dir = (
        os.path.join(scratch, n) for n in ("upload-old.jsonl", "upload-new.jsonl", "split-x")
    )
    for path in (old_file, fresh_file):
        Path(path).write_bytes(b"x")  # noqa: ASYNC240 (a test's setup)
    os.mkdir(old_dir)
    for path in (old_file, old_dir):
        os.utime(path, (0, 0))
    assert catalog.clean_scratch() == 2
    assert sorted(os.listdir(scratch)) == ["upload-new.jsonl"]


# -- methods ------------------------------------------------------------------------------------------------

BUILTINS = {"sft", "sft-lora", "qlora", "dpo", "grpo", "custom01", "custom02"}


def definition(**overrides) -> struct_pb2.Struct:
    data = {
        "name": "my-sft",
        "display_name": "My SFT",
        "training_type": "chat",
        "lifecycle": "customized",
        "stages": {"training": {"file": "train/my_sft.py", "env": "my-env"}},
        **overrides,
    }
    msg = struct_pb2.Struct()
    msg.update(data)
    return msg


async def test_builtin_methods_are_listed_with_schemas(catalog_stub):
    methods = (await catalog_stub.ListMethods(pb.ListMethodsRequest(), timeout=5)).methods
    assert BUILTINS <= {m.id for m in methods} and all(m.builtin for m in methods)
    sft = next(m for m in methods if m.id == "sft-lora")
    rank = next(p for p in sft.parameters if p.name == "lora_rank")
    assert (rank.env_name, rank.minimum, rank.default_value.number_value) == ("LORA_RANK", 1, 8)
    assert "sft-lora" in rank.applies_to and "sft" not in rank.applies_to
    assert "training_steps" in next(p for p in sft.parameters if p.name == "max_steps").aliases
    formats = {m.id: {common_pb2.DatasetFormat.Name(f) for f in m.dataset_formats} for m in methods}
    assert formats["dpo"] == {"DATASET_FORMAT_PREFERENCE"} and formats["grpo"] == {
        "DATASET_FORMAT_PROMPT_ANSWER",
        "DATASET_FORMAT_COLUMNS",
        "DATASET_FORMAT_INSTRUCTION",
    }
    assert "DATASET_FORMAT_CHAT" in formats["sft-lora"] and formats["custom01"] == set()


async def test_added_method_is_selectable_then_removed_by_delete(catalog_stub):
    created = (await catalog_stub.CreateMethod(pb.CreateMethodRequest(definition=definition()), timeout=5)).method
    assert (created.id, created.builtin, created.entrypoint) == ("my-sft", False, "train/my_sft.py")
    assert created.stages["training"]["env"] == "my-env" and len(created.parameters) > 5
    listed = {m.id for m in (await catalog_stub.ListMethods(pb.ListMethodsRequest(), timeout=5)).methods}
    assert "my-sft" in listed
    await catalog_stub.DeleteMethod(pb.DeleteMethodRequest(method_id="my-sft"), timeout=5)
    listed = {m.id for m in (await catalog_stub.ListMethods(pb.ListMethodsRequest(), timeout=5)).methods}
    assert "my-sft" not in listed
    code, _, _ = await rpc_error(catalog_stub.GetMethod, pb.GetMethodRequest(method_id="my-sft"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _ = await rpc_error(catalog_stub.CreateMethod, pb.CreateMethodRequest(definition=definition()))
    assert code == grpc.StatusCode.ALREADY_EXISTS  # jobs that used it still name it


async def test_added_method_missing_a_mandatory_file_names_the_field(catalog_stub):
    code, _, violations = await rpc_error(
        catalog_stub.CreateMethod,
        pb.CreateMethodRequest(definition=definition(lifecycle="complete")),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "definition.stages.saving.file" in {f for f, _ in violations}


async def test_racing_creates_of_one_method_name_give_one_method_and_already_exists(catalog_stub):
    import asyncio

    results = await asyncio.gather(
        *(catalog_stub.CreateMethod(pb.CreateMethodRequest(definition=definition()), timeout=10) for _ in range(5)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(failures) == 4 and {f.code() for f in failures} == {grpc.StatusCode.ALREADY_EXISTS}


async def test_builtin_method_cannot_be_deleted(catalog_stub):
    code, _, _ = await rpc_error(catalog_stub.DeleteMethod, pb.DeleteMethodRequest(method_id="sft-lora"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_resolve_parameters_names_the_bad_field(catalog_stub):
    params = struct_pb2.Struct()
    params.update({"lora_rank": 9999, "colour": "blue"})
    code, _, violations = await rpc_error(
        catalog_stub.ResolveParameters, pb.ResolveParametersRequest(method_id="sft-lora", parameters=params)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in violations} == {"parameters.lora_rank", "parameters.colour"}


async def test_unknown_ids_are_not_found_and_counted(catalog_stub):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("tuneforge_grpc_requests_total", {"method": "GetModel", "code": "NOT_FOUND"})
    for call, req in [
        (catalog_stub.GetModel, pb.GetModelRequest(model_id="nope")),
        (catalog_stub.GetDataset, pb.GetDatasetRequest(dataset_id="nope")),
        (catalog_stub.GetMethod, pb.GetMethodRequest(method_id="nope")),
    ]:
        code, _, _ = await rpc_error(call, req)
        assert code == grpc.StatusCode.NOT_FOUND
    after = REGISTRY.get_sample_value("tuneforge_grpc_requests_total", {"method": "GetModel", "code": "NOT_FOUND"})
    assert after == (before or 0) + 1


async def test_catalog_events_are_written_to_the_outbox(catalog_stub):
    await upload(catalog_stub, "evt", chat_jsonl(1))
    async with catalog_stub.catalog.engine.connect() as conn:
        subjects = [r.subject for r in await conn.execute(store.outbox.select())]
    for event in ("model.registered", "dataset.uploaded", "dataset.validated"):
        assert f"tuneforge.catalog.{event}" in subjects
