"""The catalog as seen by the jobs service: a gRPC client that speaks in domain errors."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from tuneforge.catalog.v1 import catalog_pb2 as pb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2
from tuneforge_common.auth import service_credentials
from tuneforge_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tuneforge_common.grpcutil import decode_error
from tuneforge_common.tls import TlsConfig, open_channel

from .operations import ModelInputs
from .service import CatalogInputs

TIMEOUT_S = 10.0
STATS_TIMEOUT_S = 120.0


class GrpcCatalog:
    def __init__(self, address: str, tls: TlsConfig | None = None, service_token: str = "") -> None:
        # Calls act in the project of the request being served, so the catalog scopes its answers to it.
        self.channel = open_channel(address, tls=tls, interceptors=service_credentials(service_token))
        self.stub = catalog_pb2_grpc.CatalogServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: Any, field: str) -> Any:
        try:
            return await method(request, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            decoded = decode_error(err)
            if decoded.code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"{field}: {decoded.message}") from None
            if decoded.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(
                    decoded.message, [FieldViolation(f, d) for f, d in decoded.field_violations]
                ) from None
            # The catalog's refusals are the caller's to fix (a model name taken): passed on as such, not as
            # an outage a client would retry.
            if decoded.code == grpc.StatusCode.ALREADY_EXISTS:
                raise AlreadyExists(f"{field}: {decoded.message}") from None
            if decoded.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(f"{field}: {decoded.message}") from None
            raise Unavailable("catalog service unavailable") from None

    async def resolve_inputs(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        base: dict[str, Any] | None = None,
    ) -> CatalogInputs:
        """base: an earlier job's resolved parameters that `parameters` override (a copy)."""
        model = (await self._call(self.stub.GetModel, pb.GetModelRequest(model_id=model_id), "model_id")).model
        dataset = (
            await self._call(self.stub.GetDataset, pb.GetDatasetRequest(dataset_id=dataset_id), "dataset_id")
        ).dataset
        _check_ready(dataset, "dataset_id")
        method = (await self._call(self.stub.GetMethod, pb.GetMethodRequest(method_id=method_id), "method_id")).method
        _check_format(dataset, method, "dataset_id")
        if base is not None:
            parameters = _override(base, parameters, method)
        given = struct_pb2.Struct()
        given.update({**_dataset_columns(dataset, method, parameters), **parameters})
        resolved = await self._call(
            self.stub.ResolveParameters,
            pb.ResolveParametersRequest(method_id=method_id, parameters=given),
            "parameters",
        )
        saving_entrypoint, saving_env = _saving_stage(method)
        return CatalogInputs(
            model_uri=model.uri,
            dataset_uri=dataset.uri,
            entrypoint=method.entrypoint,
            parameters=_ints_back(json_format.MessageToDict(resolved.parameters), method),
            method_version=hashlib.sha256(method.SerializeToString(deterministic=True)).hexdigest()[:16],
            catalog_version=(
                f"model {model.id} updated {model.update_time.ToJsonString()}; dataset sha256 {dataset.sha256[:16]}"
            ),
            dataset_rows=dataset.row_count,
            python_env=_training_env(method),
            saving_entrypoint=saving_entrypoint,
            saving_python_env=saving_env,
        )

    async def validation_dataset_uri(self, dataset_id: str, method_id: str) -> str:
        field = "validation_dataset_id"
        dataset = (await self._call(self.stub.GetDataset, pb.GetDatasetRequest(dataset_id=dataset_id), field)).dataset
        _check_ready(dataset, field)
        method = (await self._call(self.stub.GetMethod, pb.GetMethodRequest(method_id=method_id), "method_id")).method
        if "validation_ratio" not in {p.name for p in method.parameters}:
            # Only methods that evaluate take the flag; an added method's own script would refuse it unknown.
            raise FailedPrecondition(
                f"{field}: method {method_id!r} does not evaluate on a validation set (it has no validation_ratio)"
            )
        _check_format(dataset, method, field)
        return str(dataset.uri)

    async def dataset_tokens(self, dataset_id: str, model_id: str, max_seq_length: int) -> tuple[int, int]:
        """(total tokens, rows over max_seq_length) with the model's tokenizer: a pass over the dataset."""
        request = pb.GetDatasetStatsRequest(dataset_id=dataset_id, model_id=model_id, max_seq_length=max_seq_length)
        try:
            stats = await self.stub.GetDatasetStats(request, timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return 0, 0  # an estimate without a token count is still an estimate
        return stats.total_tokens, stats.rows_truncated

    async def model_inputs(self, model_id: str) -> ModelInputs:
        """A model as a merge, evaluation or deployment needs it: its files, its base's for an adapter, and the
        stages of the added method that trained it (its own saving and inference files)."""
        model = (await self._call(self.stub.GetModel, pb.GetModelRequest(model_id=model_id), "model_id")).model
        kind = common_pb2.ModelKind.Name(model.kind).removeprefix("MODEL_KIND_")
        base_id = model.lineage.base_model_id
        base_uri = ""
        if kind == "CUSTOMIZED" and base_id:
            try:
                base_uri = (await self.stub.GetModel(pb.GetModelRequest(model_id=base_id), timeout=TIMEOUT_S)).model.uri
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise Unavailable("catalog service unavailable") from None
        stages: dict[str, Any] = {}
        lifecycle = training_env = ""
        if model.lineage.method_id:
            try:
                method = (
                    await self.stub.GetMethod(pb.GetMethodRequest(method_id=model.lineage.method_id), timeout=TIMEOUT_S)
                ).method
            except grpc.aio.AioRpcError as err:  # a deleted method: the built-in programs do the step
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise Unavailable("catalog service unavailable") from None
            else:
                stages = json_format.MessageToDict(method.stages)
                lifecycle, training_env = method.lifecycle, _training_env(method)
        return ModelInputs(
            model_id=model.id,
            name=model.name,
            kind=kind,
            uri=model.uri,
            base_model_id=base_id,
            base_uri=base_uri,
            lineage=json_format.MessageToDict(model.lineage, preserving_proto_field_name=True),
            stages=stages,
            lifecycle=lifecycle,
            training_env=training_env,
        )

    async def evaluation_dataset(self, dataset_id: str) -> str:
        """The URI of a READY dataset to evaluate on."""
        field = "dataset_id"
        dataset = (await self._call(self.stub.GetDataset, pb.GetDatasetRequest(dataset_id=dataset_id), field)).dataset
        _check_ready(dataset, field)
        return str(dataset.uri)

    async def publish_model(self, name: str, description: str, uri: str, kind: str, lineage: dict[str, Any]) -> str:
        request = pb.PublishModelRequest(
            name=name,
            description=description,
            uri=uri,
            kind=common_pb2.ModelKind.Value(f"MODEL_KIND_{kind}") if kind else common_pb2.MODEL_KIND_UNSPECIFIED,
            lineage=json_format.ParseDict(lineage, common_pb2.ModelLineage()),
        )
        return (await self._call(self.stub.PublishModel, request, "name")).model.id


def _override(base: dict[str, Any], overrides: dict[str, Any], method: Any) -> dict[str, Any]:
    """A copy's parameters: the old job's, with each override under its canonical name (an alias or an
    environment name given for a parameter replaces it rather than clashing with it)."""
    canonical = {}
    for spec in method.parameters:
        for spelling in (spec.name, spec.env_name, *spec.aliases):
            canonical[spelling] = spec.name
    merged = {k: v for k, v in base.items() if k in {p.name for p in method.parameters}}
    for key, value in overrides.items():
        merged[canonical.get(key, key)] = value
    return merged


def _training_env(method: Any) -> str:
    """An added method's training environment (its stages.training.env); "" for a built-in, which has no stages."""
    training = json_format.MessageToDict(method.stages).get("training")
    env = training.get("env") if isinstance(training, dict) else None
    return env.strip() if isinstance(env, str) else ""


def _saving_stage(method: Any) -> tuple[str, str]:
    """An added method's saving stage as (file, env): what the agent runs after the training. ("", "") for a
    built-in and for the customized lifecycle, which has none (the catalog stores saving only for complete and
    live, with its env defaulted to the training env; defaulted here too should an older row lack it)."""
    if method.lifecycle not in ("complete", "live"):
        return "", ""
    saving = json_format.MessageToDict(method.stages).get("saving")
    if not isinstance(saving, dict) or not isinstance(saving.get("file"), str) or not saving["file"].strip():
        return "", ""
    env = saving.get("env")
    return saving["file"].strip(), env.strip() if isinstance(env, str) and env.strip() else _training_env(method)


def _check_ready(dataset: Any, field: str) -> None:
    if dataset.status != common_pb2.DATASET_STATUS_READY:
        status = common_pb2.DatasetStatus.Name(dataset.status).removeprefix("DATASET_STATUS_")
        problems = f" ({dataset.validation.problem_count} problems)" if dataset.validation.problem_count else ""
        raise FailedPrecondition(f"{field}: dataset {dataset.id!r} is {status}{problems}; only READY datasets train")


def _check_format(dataset: Any, method: Any, field: str) -> None:
    if method.dataset_formats and dataset.format not in method.dataset_formats:
        # Refused here, before a GPU node loads a model only to find rows it can't train on.
        wanted = ", ".join(_format_name(f) for f in method.dataset_formats)
        raise FailedPrecondition(
            f"{field}: method {method.id!r} trains on {wanted} datasets; "
            f"dataset {dataset.id!r} is {_format_name(dataset.format)}"
        )


def _format_name(value: common_pb2.DatasetFormat.ValueType) -> str:
    return common_pb2.DatasetFormat.Name(value).removeprefix("DATASET_FORMAT_").lower()


def _dataset_columns(dataset: Any, method: Any, given: dict[str, Any]) -> dict[str, str]:
    """The dataset's column mapping (named at upload or detected) as the job's default for the method's
    prompt_input_column / prompt_output_column, so a mapped dataset trains without repeating it."""
    if dataset.format != common_pb2.DATASET_FORMAT_COLUMNS:
        return {}
    mapping = {
        "prompt_input_column": dataset.prompt_input_column,
        "prompt_output_column": dataset.prompt_output_column,
    }
    defaults = {}
    for spec in method.parameters:
        spelled = {spec.name, spec.env_name, *spec.aliases}  # the user may have set it under any of them
        set_by_user = {key for key, value in given.items() if value is not None}  # null means not given
        if mapping.get(spec.name) and not spelled & set_by_user:
            defaults[spec.name] = mapping[spec.name]
    return defaults


def _ints_back(values: dict[str, Any], method: Any) -> dict[str, Any]:
    # protobuf Struct carries every number as a double; restore the schema's integers.
    ints = {p.name for p in method.parameters if p.type == 1}
    return {k: int(v) if k in ints and isinstance(v, float) else v for k, v in values.items()}
