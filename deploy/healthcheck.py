"""Container healthcheck: exit 0 when the local gRPC server answers grpc.health.v1 SERVING, else 1.

Usage: python healthcheck.py PORT. Health checks need no API key, so Docker's HEALTHCHECK can call it as is
(Kubernetes uses its own `grpc:` probe instead). Plaintext only: with TLS on, check the gateway's /healthz.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: healthcheck.py PORT", file=sys.stderr)
        return 2
    with grpc.insecure_channel(f"127.0.0.1:{argv[1]}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)
            return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
