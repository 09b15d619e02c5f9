"""CatalogService gRPC surface: decode, call the use case, encode. No rules live here."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from tuneforge.catalog.v1 import catalog_pb2 as pb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2
from tuneforge_common import methods as method_defs
from tuneforge_common.errors import InvalidArgument
from tuneforge_common.grpcutil import ServiceBinding, map_errors
from tuneforge_common.paging import struct, timestamp
from tuneforge_common.params import ParamSpec

from . import store
from .service import Catalog

_PARAM_TYPES = {
    "int": common_pb2.PARAMETER_TYPE_INT,
    "float": common_pb2.PARAMETER_TYPE_FLOAT,
    "bool": common_pb2.PARAMETER_TYPE_BOOL,
    "string": common_pb2.PARAMETER_TYPE_STRING,
}
_FORMATS = {
    "chat": common_pb2.DATASET_FORMAT_CHAT,
    "prompt_completion": common_pb2.DATASET_FORMAT_PROMPT_COMPLETION,
    "preference": common_pb2.DATASET_FORMAT_PREFERENCE,
    "text": common_pb2.DATASET_FORMAT_TEXT,
    "instruction": common_pb2.DATASET_FORMAT_INSTRUCTION,
    "columns": common_pb2.DATASET_FORMAT_COLUMNS,
    "prompt_answer": common_pb2.DATASET_FORMAT_PROMPT_ANSWER,
}
_FORMAT_NAMES = {v: k for k, v in _FORMATS.items()}
_STATUSES = {
    "VALIDATING": common_pb2.DATASET_STATUS_VALIDATING,
    "READY": common_pb2.DATASET_STATUS_READY,
    "INVALID": common_pb2.DATASET_STATUS_INVALID,
}


def format_name(value: int) -> str:
    if value and value not in _FORMAT_NAMES:
        raise InvalidArgument.for_field("format", f"unknown dataset format {value}")
    return _FORMAT_NAMES.get(value, "")  # type: ignore[call-overload]


def model_to_pb(row: Any) -> common_pb2.Model:
    lineage = json.loads(row.lineage or "{}")
    return common_pb2.Model(
        project_id=row.project_id or "",
        id=row.id,
        name=row.name,
        description=row.description,
        uri=row.uri,
        architecture=row.architecture,
        parameter_count=row.parameter_count,
        context_length=row.context_length,
        dtype=row.dtype,
        has_chat_template=row.has_chat_template,
        builtin=row.builtin,
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
        tags=json.loads(row.tags or "[]"),
        license=row.license,
        size_bytes=row.size_bytes,
        kind=common_pb2.ModelKind.Value(f"MODEL_KIND_{row.kind}"),
        lineage=common_pb2.ModelLineage(**lineage) if lineage else None,
        source=row.source,
    )


def dataset_to_pb(row: Any, with_problems: bool = True) -> common_pb2.Dataset:
    """with_problems=False keeps list pages small: up to 100 problems a dataset is for GetDataset."""
    report = json.loads(row.validation or "{}")
    return common_pb2.Dataset(
        project_id=row.project_id or "",
        id=row.id,
        name=row.name,
        description=row.description,
        uri=row.uri,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        row_count=row.row_count,
        format=_FORMATS.get(row.format, common_pb2.DATASET_FORMAT_UNSPECIFIED),
        columns=json.loads(row.columns),
        create_time=timestamp(row.created_at),
        status=_STATUSES.get(row.status, common_pb2.DATASET_STATUS_UNSPECIFIED),
        validation=common_pb2.DatasetValidation(
            problems=[common_pb2.ValidationProblem(**p) for p in report.get("problems", [])] if with_problems else [],
            problem_count=report.get("problem_count", 0),
        ),
        prompt_input_column=row.prompt_input_column,
        prompt_output_column=row.prompt_output_column,
        parent_dataset_id=row.parent_dataset_id or "",
    )


def spec_to_pb(spec: ParamSpec) -> common_pb2.ParameterSpec:
    msg = common_pb2.ParameterSpec(
        name=spec.name,
        type=_PARAM_TYPES[spec.type],
        help=spec.help,
        choices=spec.choices,
        env_name=spec.env_name,
        aliases=spec.aliases,
        group=spec.group,
        required=spec.required,
        applies_to=spec.applies_to,
    )
    json_format.ParseDict(spec.default, msg.default_value)
    if spec.minimum is not None:
        msg.minimum = spec.minimum
    if spec.maximum is not None:
        msg.maximum = spec.maximum
    return msg


def method_to_pb(row: Any) -> common_pb2.TrainingMethod:
    specs = [ParamSpec.from_json(s) for s in json.loads(row.parameters)]
    return common_pb2.TrainingMethod(
        project_id=row.project_id or "",
        id=row.name,
        display_name=row.display_name,
        description=row.description,
        training_type=row.training_type,
        lifecycle=row.lifecycle,
        parameters=[spec_to_pb(s) for s in specs],
        entrypoint=row.entrypoint,
        builtin=row.builtin,
        create_time=timestamp(row.created_at),
        stages=struct(json.loads(row.stages or "{}")),
        dataset_formats=[_FORMATS[f] for f in _builtin_formats(row)],
    )


def _builtin_formats(row: Any) -> tuple[str, ...]:
    # Built-in methods' formats follow the installed code; added methods train on any format.
    definition = method_defs.builtin_method(row.name) if row.builtin else None
    return definition.dataset_formats if definition else ()


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @map_errors
    async def RegisterModel(self, request: pb.RegisterModelRequest, context: Any) -> pb.RegisterModelResponse:
        kind = request.WhichOneof("source") or ""
        row = await self.catalog.register_model(
            kind,
            getattr(request, kind) if kind else "",
            request.name,
            request.description,
            list(request.tags),
            request.license,
        )
        return pb.RegisterModelResponse(model=model_to_pb(row))

    @map_errors
    async def PublishModel(self, request: pb.PublishModelRequest, context: Any) -> pb.PublishModelResponse:
        kind = common_pb2.ModelKind.Name(request.kind).removeprefix("MODEL_KIND_") if request.kind else ""
        lineage = json_format.MessageToDict(request.lineage, preserving_proto_field_name=True)
        if "checkpoint_step" in lineage:
            lineage["checkpoint_step"] = int(lineage["checkpoint_step"])  # int64 arrives as a JSON string
        row = await self.catalog.publish_model(request.name, request.description, request.uri, kind, lineage)
        return pb.PublishModelResponse(model=model_to_pb(row))

    @map_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        kind = common_pb2.ModelKind.Name(request.kind).removeprefix("MODEL_KIND_") if request.kind else ""
        rows, token = await self.catalog.list_models(
            request.page_size, request.page_token, kind, request.tag, request.name_contains
        )
        return pb.ListModelsResponse(models=[model_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_to_pb(await self.catalog.get_model(request.model_id)))

    @map_errors
    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Any) -> pb.UpdateModelResponse:
        if not request.update_mask.paths:
            raise InvalidArgument.for_field("update_mask", "name the fields to update")
        changes = {path: getattr(request.model, path, None) for path in request.update_mask.paths if path}
        row = await self.catalog.update_model(request.model_id, changes)
        return pb.UpdateModelResponse(model=model_to_pb(row))

    @map_errors
    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Any) -> pb.DeleteModelResponse:
        await self.catalog.delete_model(request.model_id)
        return pb.DeleteModelResponse()

    @map_errors
    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Any) -> pb.ListDatasetsResponse:
        status = common_pb2.DatasetStatus.Name(request.status).removeprefix("DATASET_STATUS_") if request.status else ""
        rows, token = await self.catalog.list_datasets(
            request.page_size,
            request.page_token,
            status,
            format_name(request.format),
            request.name_contains,
            newest_first=request.newest_first,
            after_dataset_id=request.after_dataset_id,
        )
        datasets = [dataset_to_pb(r, with_problems=False) for r in rows]
        return pb.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    @map_errors
    async def GetDataset(self, request: pb.GetDatasetRequest, context: Any) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=dataset_to_pb(await self.catalog.get_dataset(request.dataset_id)))

    @map_errors
    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context: Any) -> pb.DeleteDatasetResponse:
        await self.catalog.delete_dataset(request.dataset_id)
        return pb.DeleteDatasetResponse()

    @map_errors
    async def DownloadDataset(
        self, request: pb.DownloadDatasetRequest, context: Any
    ) -> AsyncIterator[pb.DownloadDatasetResponse]:
        async for chunk in self.catalog.download_dataset(request.dataset_id):
            yield pb.DownloadDatasetResponse(chunk=chunk)

    @map_errors
    async def PreviewDataset(self, request: pb.PreviewDatasetRequest, context: Any) -> pb.PreviewDatasetResponse:
        rows = await self.catalog.preview_dataset(request.dataset_id, request.limit)
        return pb.PreviewDatasetResponse(rows=[struct(r) for r in rows])

    @map_errors
    async def GetDatasetStats(self, request: pb.GetDatasetStatsRequest, context: Any) -> pb.GetDatasetStatsResponse:
        stats = await self.catalog.dataset_stats(request.dataset_id, request.model_id, request.max_seq_length)
        return pb.GetDatasetStatsResponse(
            row_count=stats["rows"],
            min_tokens=stats["min"],
            mean_tokens=stats["mean"],
            p50_tokens=stats["p50"],
            p95_tokens=stats["p95"],
            max_tokens=stats["max"],
            total_tokens=stats["total"],
            rows_truncated=stats["rows_truncated"],
        )

    @map_errors
    async def SplitDataset(self, request: pb.SplitDatasetRequest, context: Any) -> pb.SplitDatasetResponse:
        train, validation = await self.catalog.split_dataset(request.dataset_id, request.validation_ratio, request.seed)
        return pb.SplitDatasetResponse(train=dataset_to_pb(train), validation=dataset_to_pb(validation))

    @map_errors
    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadDatasetResponse:
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument.for_field("metadata", "upload stream is empty") from None
        if first.WhichOneof("payload") != "metadata":
            raise InvalidArgument.for_field("metadata", "the first message must carry the metadata")

        async def chunks() -> AsyncIterator[bytes]:
            async for msg in iterator:
                if msg.WhichOneof("payload") != "chunk":
                    raise InvalidArgument.for_field("chunk", "metadata may only be sent once, first")
                yield msg.chunk

        meta = first.metadata
        row = await self.catalog.upload_dataset(
            meta.name,
            meta.description,
            chunks(),
            format_name(meta.format),
            meta.prompt_input_column,
            meta.prompt_output_column,
        )
        return pb.UploadDatasetResponse(dataset=dataset_to_pb(row))

    @map_errors
    async def ListMethods(self, request: pb.ListMethodsRequest, context: Any) -> pb.ListMethodsResponse:
        rows, token = await store.list_page(
            self.catalog.engine,
            store.methods,
            request.page_size,
            request.page_token,
            [store.methods.c.builtin.desc(), store.methods.c.name, store.methods.c.id],
            [store.methods.c.deleted_at.is_(None)],
        )
        return pb.ListMethodsResponse(methods=[method_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def GetMethod(self, request: pb.GetMethodRequest, context: Any) -> pb.GetMethodResponse:
        return pb.GetMethodResponse(method=method_to_pb(await self.catalog.get_method(request.method_id)))

    @map_errors
    async def CreateMethod(self, request: pb.CreateMethodRequest, context: Any) -> pb.CreateMethodResponse:
        row = await self.catalog.create_method(json_format.MessageToDict(request.definition))
        return pb.CreateMethodResponse(method=method_to_pb(row))

    @map_errors
    async def DeleteMethod(self, request: pb.DeleteMethodRequest, context: Any) -> pb.DeleteMethodResponse:
        await self.catalog.delete_method(request.method_id)
        return pb.DeleteMethodResponse()

    @map_errors
    async def ResolveParameters(
        self, request: pb.ResolveParametersRequest, context: Any
    ) -> pb.ResolveParametersResponse:
        given = json_format.MessageToDict(request.parameters)
        resolved = await self.catalog.resolve_parameters(request.method_id, given)
        return pb.ResolveParametersResponse(parameters=struct(resolved))


def binding(catalog: Catalog) -> ServiceBinding:
    return ServiceBinding(
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
        CatalogServicer(catalog),
        pb.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    )
