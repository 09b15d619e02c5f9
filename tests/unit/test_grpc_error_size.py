"""A domain error's status fits the trailing metadata a gRPC client accepts (8 KiB), however many fields
were wrong: the first ones are shown with their descriptions, the rest counted in the message."""

from __future__ import annotations

import grpc

from tuneforge_common.errors import FieldViolation, InvalidArgument
from tuneforge_common.grpcutil import MAX_VIOLATIONS, status_for


def metadata_bytes(status: grpc.Status) -> int:
    return sum(len(k) + len(v if isinstance(v, bytes) else v.encode()) for k, v in status.trailing_metadata)


def test_an_error_with_hundreds_of_long_violations_stays_under_the_metadata_limit_and_counts_the_rest():
    violations = [FieldViolation(f"definition.parameters[{i}].name" + "x" * 300, "y" * 2000) for i in range(500)]
    status = status_for(InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata_bytes(status) * 4 // 3 < 8192  # base64 on the wire for -bin keys
    assert status.details.endswith(f"(and {500 - MAX_VIOLATIONS} more problems)")


def test_a_small_error_is_passed_on_whole():
    violations = [FieldViolation("parameters.lora_rank", "must be at least 1")]
    status = status_for(InvalidArgument("parameters.lora_rank: must be at least 1", violations))
    assert status.details == "parameters.lora_rank: must be at least 1"
