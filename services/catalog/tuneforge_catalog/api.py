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
}


def model_to_pb(row: Any) -> common_pb2.Model:
    return common_pb2.Model(
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
    )


def dataset_to_pb(row: Any) -> common_pb2.Dataset:
    return common_pb2.Dataset(
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
        id=row.id,
        display_name=row.display_name,
        description=row.description,
        training_type=row.training_type,
        lifecycle=row.lifecycle,
        parameters=[spec_to_pb(s) for s in specs],
        entrypoint=row.entrypoint,
        builtin=row.builtin,
        create_time=timestamp(row.created_at),
    )


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @map_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        rows, token = await store.list_page(
            self.catalog.engine,
            store.models,
            request.page_size,
            request.page_token,
            [store.models.c.created_at, store.models.c.id],
        )
        return pb.ListModelsResponse(models=[model_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_to_pb(await self.catalog.get_model(request.model_id)))

    @map_errors
    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Any) -> pb.ListDatasetsResponse:
        rows, token = await store.list_page(
            self.catalog.engine,
            store.datasets,
            request.page_size,
            request.page_token,
            [store.datasets.c.created_at, store.datasets.c.id],
        )
        return pb.ListDatasetsResponse(datasets=[dataset_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def GetDataset(self, request: pb.GetDatasetRequest, context: Any) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=dataset_to_pb(await self.catalog.get_dataset(request.dataset_id)))

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

        row = await self.catalog.upload_dataset(first.metadata.name, first.metadata.description, chunks())
        return pb.UploadDatasetResponse(dataset=dataset_to_pb(row))

    @map_errors
    async def ListMethods(self, request: pb.ListMethodsRequest, context: Any) -> pb.ListMethodsResponse:
        rows, token = await store.list_page(
            self.catalog.engine, store.methods, request.page_size, request.page_token, [store.methods.c.id]
        )
        return pb.ListMethodsResponse(methods=[method_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def GetMethod(self, request: pb.GetMethodRequest, context: Any) -> pb.GetMethodResponse:
        return pb.GetMethodResponse(method=method_to_pb(await self.catalog.get_method(request.method_id)))

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
