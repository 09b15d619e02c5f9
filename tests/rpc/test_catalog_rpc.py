"""CatalogService over a real in-process grpc.aio server (port 0), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import chat_jsonl, write_fake_model_dir
from tuneforge.catalog.v1 import catalog_pb2 as pb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge_catalog import api, store
from tuneforge_catalog.main import CatalogSettings, build_catalog
from tuneforge_common.grpcutil import decode_error, start_server


@pytest.fixture
async def catalog_stub(database_url, tmp_path) -> AsyncIterator[catalog_pb2_grpc.CatalogServiceStub]:
    model_dir = write_fake_model_dir(tmp_path / "models" / "tiny-test", params=100)
    settings = CatalogSettings(
        catalog_database_url=database_url,
        artifact_root=str(tmp_path / "artifacts"),
        catalog_max_dataset_bytes=4096,
        catalog_seed_models=str(model_dir),
    )
    catalog, _publisher = await build_catalog(settings)
    server, port = await start_server([api.binding(catalog)], "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    stub.health = health_pb2_grpc.HealthStub(channel)
    stub.catalog = catalog
    yield stub
    await channel.close()
    await server.stop(None)
    await catalog.engine.dispose()


async def upload(stub, name: str, *chunks: bytes) -> pb.UploadDatasetResponse:
    async def requests():
        yield pb.UploadDatasetRequest(metadata=pb.DatasetUploadMetadata(name=name))
        for chunk in chunks:
            yield pb.UploadDatasetRequest(chunk=chunk)

    return await stub.UploadDataset(requests(), timeout=10)


async def test_health_and_reflection_are_served(catalog_stub):
    resp = await catalog_stub.health.Check(
        health_pb2.HealthCheckRequest(service="tuneforge.catalog.v1.CatalogService"), timeout=5
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_seeded_model_is_inspected_without_loading_it(catalog_stub):
    models = (await catalog_stub.ListModels(pb.ListModelsRequest(), timeout=5)).models
    assert [m.id for m in models] == ["tiny-test"]
    m = models[0]
    assert (m.architecture, m.parameter_count, m.context_length, m.has_chat_template) == (
        "LlamaForCausalLM",
        100,
        2048,
        True,
    )


async def test_upload_in_chunks_counts_rows_and_dedups_content(catalog_stub, tmp_path):
    data = chat_jsonl(5)
    first = await upload(catalog_stub, "a", data[:7], data[7:])
    second = await upload(catalog_stub, "b", data)
    assert first.dataset.row_count == 5 and first.dataset.sha256 == second.dataset.sha256
    assert first.dataset.uri == second.dataset.uri  # same bytes, one stored copy
    stored = list((tmp_path / "artifacts" / "datasets" / "sha256").iterdir())
    assert len(stored) == 1


async def test_bad_jsonl_is_refused_with_line_number_and_nothing_stored(catalog_stub, tmp_path):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await upload(catalog_stub, "bad", chat_jsonl(2) + b"{oops\n")
    err = decode_error(exc.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field_violations == [
        ("content", "line 3: not valid JSON (Expecting property name enclosed in double quotes at column 2)")
    ]
    assert (await catalog_stub.ListDatasets(pb.ListDatasetsRequest(), timeout=5)).datasets == []
    assert not (tmp_path / "artifacts" / "datasets").exists()


async def test_upload_over_the_limit_is_resource_exhausted(catalog_stub):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await upload(catalog_stub, "big", b"x" * 3000, b"x" * 3000)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096 bytes" in exc.value.details()


async def test_unknown_ids_are_not_found(catalog_stub):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("tuneforge_grpc_requests_total", {"method": "GetModel", "code": "NOT_FOUND"})
    for call, req in [
        (catalog_stub.GetModel, pb.GetModelRequest(model_id="nope")),
        (catalog_stub.GetDataset, pb.GetDatasetRequest(dataset_id="nope")),
        (catalog_stub.GetMethod, pb.GetMethodRequest(method_id="nope")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(req, timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    after = REGISTRY.get_sample_value("tuneforge_grpc_requests_total", {"method": "GetModel", "code": "NOT_FOUND"})
    assert after == (before or 0) + 1  # counted by code for Prometheus


async def test_sft_lora_schema_is_listed_with_help_and_bounds(catalog_stub):
    methods = (await catalog_stub.ListMethods(pb.ListMethodsRequest(), timeout=5)).methods
    sft = next(m for m in methods if m.id == "sft-lora")
    rank = next(p for p in sft.parameters if p.name == "lora_rank")
    assert (rank.env_name, rank.minimum, rank.maximum, rank.default_value.number_value) == ("LORA_RANK", 1, 256, 8)
    assert "training_steps" in next(p for p in sft.parameters if p.name == "max_steps").aliases


async def test_resolve_parameters_names_the_bad_field(catalog_stub):
    params = struct_pb2.Struct()
    params.update({"lora_rank": 9999, "colour": "blue"})
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await catalog_stub.ResolveParameters(
            pb.ResolveParametersRequest(method_id="sft-lora", parameters=params), timeout=5
        )
    err = decode_error(exc.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in err.field_violations} == {"parameters.lora_rank", "parameters.colour"}


async def test_list_pages_with_tokens(catalog_stub):
    for i in range(3):
        await upload(catalog_stub, f"d{i}", chat_jsonl(1 + i))
    page1 = await catalog_stub.ListDatasets(pb.ListDatasetsRequest(page_size=2), timeout=5)
    page2 = await catalog_stub.ListDatasets(
        pb.ListDatasetsRequest(page_size=2, page_token=page1.next_page_token), timeout=5
    )
    assert [d.name for d in page1.datasets] + [d.name for d in page2.datasets] == ["d0", "d1", "d2"]
    assert page2.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await catalog_stub.ListDatasets(pb.ListDatasetsRequest(page_token="garbage!"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_catalog_events_are_written_to_the_outbox(catalog_stub):
    await upload(catalog_stub, "evt", chat_jsonl(1))
    async with catalog_stub.catalog.engine.connect() as conn:
        subjects = [r.subject for r in await conn.execute(store.outbox.select())]
    assert "tuneforge.catalog.model.registered" in subjects and "tuneforge.catalog.dataset.created" in subjects
