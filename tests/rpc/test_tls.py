"""TLS and mTLS on the services' gRPC servers and channels, and HTTPS on the gateway.

A throwaway PKI is made per module with `cryptography`: a CA, a server and a client certificate it signs (both
for 127.0.0.1 and localhost), and a second, unrelated CA with a certificate of its own, to prove that only the
configured CA is trusted.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_catalog.jobs_client import GrpcJobs
from tuneforge_common.config import CommonSettings
from tuneforge_common.grpcutil import ServiceBinding, start_server
from tuneforge_common.tls import TlsConfig, TlsConfigError, open_channel
from tuneforge_jobs.catalog_client import GrpcCatalog
from tuneforge_trainer.agent import Agent, AgentSettings

ONE_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _make_ca(directory: Path, common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{common_name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _make_leaf(
    directory: Path, common_name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, good for serving and for presenting as a client (as a
    service's certificate is under mTLS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    rogue_cert: Path  # signed by other_ca
    rogue_key: Path

    def server(self, *, require_client_cert: bool = False) -> TlsConfig:
        return TlsConfig(str(self.server_cert), str(self.server_key), str(self.ca), require_client_cert)

    def client(self) -> TlsConfig:
        return TlsConfig(str(self.client_cert), str(self.client_key), str(self.ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = _make_ca(directory, "tuneforge-test-ca")
    other_key, other_cert, other_path = _make_ca(directory, "some-other-ca")
    server_cert, server_key = _make_leaf(directory, "catalog", ca_key, ca_cert)
    client_cert, client_key = _make_leaf(directory, "gateway", ca_key, ca_cert)
    rogue_cert, rogue_key = _make_leaf(directory, "rogue", other_key, other_cert)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, other_path, rogue_cert, rogue_key)


@asynccontextmanager
async def grpc_server(tls: TlsConfig | None, bindings: list[ServiceBinding] | None = None) -> AsyncIterator[str]:
    server, port = await start_server(bindings or [], "127.0.0.1", 0, tls=tls)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def health(channel: grpc.aio.Channel) -> str:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await health(channel)
    return failure.value.code()


async def test_tls_server_answers_health_checks_over_a_channel_that_trusts_its_ca(pki: Pki) -> None:
    async with grpc_server(pki.server()) as address:
        async with open_channel(address, tls=TlsConfig(ca_file=str(pki.ca))) as channel:
            assert await health(channel) == "SERVING"


async def test_plaintext_client_cannot_call_a_tls_server(pki: Pki) -> None:
    async with grpc_server(pki.server()) as address:
        assert await refused(open_channel(address, tls=None)) == grpc.StatusCode.UNAVAILABLE


async def test_client_trusting_another_ca_refuses_the_server(pki: Pki) -> None:
    async with grpc_server(pki.server()) as address:
        distrustful = open_channel(address, tls=TlsConfig(ca_file=str(pki.other_ca)))
        assert await refused(distrustful) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_server_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    async with grpc_server(pki.server(require_client_cert=True)) as address:
        without_cert = open_channel(address, tls=TlsConfig(ca_file=str(pki.ca)))
        assert await refused(without_cert) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_server_accepts_a_client_certificate_signed_by_its_ca(pki: Pki) -> None:
    async with grpc_server(pki.server(require_client_cert=True)) as address:
        async with open_channel(address, tls=pki.client()) as channel:
            assert await health(channel) == "SERVING"


async def test_mtls_server_refuses_a_client_certificate_signed_by_another_ca(pki: Pki) -> None:
    rogue = TlsConfig(str(pki.rogue_cert), str(pki.rogue_key), str(pki.ca))  # trusts the server, but isn't trusted
    async with grpc_server(pki.server(require_client_cert=True)) as address:
        assert await refused(open_channel(address, tls=rogue)) == grpc.StatusCode.UNAVAILABLE


async def test_catalog_and_jobs_clients_dial_their_peer_over_mtls(pki: Pki) -> None:
    async with grpc_server(pki.server(require_client_cert=True)) as address:
        jobs_from_catalog = GrpcJobs(address, pki.client())
        catalog_from_jobs = GrpcCatalog(address, pki.client())
        try:
            assert await health(jobs_from_catalog.channel) == "SERVING"
            assert await health(catalog_from_jobs.channel) == "SERVING"
        finally:
            await jobs_from_catalog.close()
            await catalog_from_jobs.close()


class RegisteringAgentService(agent_pb2_grpc.AgentServiceServicer):
    """Records who registered (the client certificate's common name) and nothing more."""

    def __init__(self) -> None:
        self.registered: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()

    async def RegisterAgent(self, request: apb.RegisterAgentRequest, context: Any) -> apb.RegisterAgentResponse:
        if not self.registered.done():
            self.registered.set_result(context.auth_context().get("x509_common_name", []))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this fake only records registrations")


async def test_agent_registers_with_the_jobs_service_over_mtls(pki: Pki, tmp_path: Path) -> None:
    service = RegisteringAgentService()
    binding = ServiceBinding(
        agent_pb2_grpc.add_AgentServiceServicer_to_server,
        service,
        apb.DESCRIPTOR.services_by_name["AgentService"].full_name,
    )
    async with grpc_server(pki.server(require_client_cert=True), [binding]) as address:
        settings = AgentSettings(
            jobs_address=address,
            agent_work_dir=str(tmp_path / "agent"),
            tls_cert_file=str(pki.client_cert),
            tls_key_file=str(pki.client_key),
            tls_ca_file=str(pki.ca),
        )
        runner = asyncio.create_task(Agent(settings).run_forever())
        try:
            assert await asyncio.wait_for(service.registered, 30) == [b"gateway"]
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


def _settings(pki: Pki, **tls: Any) -> CommonSettings:
    return CommonSettings(**{"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)} | tls)


@pytest.mark.parametrize(
    ("tls", "setting"),
    [
        ({"tls_cert_file": "/nonexistent/server.crt"}, "TUNEFORGE_TLS_CERT_FILE"),
        ({"tls_key_file": "/nonexistent/server.key"}, "TUNEFORGE_TLS_KEY_FILE"),
        ({"tls_key_file": ""}, "TUNEFORGE_TLS_KEY_FILE"),
        ({"tls_ca_file": "/nonexistent/ca.crt"}, "TUNEFORGE_TLS_CA_FILE"),
        ({"tls_require_client_cert": True}, "TUNEFORGE_TLS_CA_FILE"),
    ],
    ids=["missing-cert", "missing-key", "cert-without-key", "missing-ca", "mtls-without-ca"],
)
def test_tls_settings_that_cannot_work_fail_at_start_naming_the_setting(
    pki: Pki, tls: dict[str, Any], setting: str
) -> None:
    with pytest.raises(TlsConfigError, match=setting):
        TlsConfig.from_settings(_settings(pki, **tls))


def test_a_key_that_is_not_the_certificates_own_fails_at_start(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="TUNEFORGE_TLS_CERT_FILE=.*TUNEFORGE_TLS_KEY_FILE="):
        TlsConfig.from_settings(_settings(pki, tls_key_file=str(pki.client_key)))


def test_tls_settings_come_from_tuneforge_tls_environment_variables(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_TLS_CERT_FILE", str(pki.server_cert))
    monkeypatch.setenv("TUNEFORGE_TLS_KEY_FILE", str(pki.server_key))
    monkeypatch.setenv("TUNEFORGE_TLS_CA_FILE", str(pki.ca))
    monkeypatch.setenv("TUNEFORGE_TLS_REQUIRE_CLIENT_CERT", "true")
    assert TlsConfig.from_settings(CommonSettings()) == pki.server(require_client_cert=True)


async def test_missing_cert_file_fails_the_server_start_naming_the_setting(pki: Pki) -> None:
    tls = TlsConfig("/nonexistent/server.crt", str(pki.server_key), str(pki.ca))
    with pytest.raises(TlsConfigError, match="TUNEFORGE_TLS_CERT_FILE=/nonexistent/server.crt"):
        await start_server([], "127.0.0.1", 0, tls=tls)


def test_agent_with_a_missing_cert_file_fails_at_construction_not_in_its_connect_loop(tmp_path: Path) -> None:
    settings = AgentSettings(
        agent_work_dir=str(tmp_path), tls_cert_file="/nonexistent/agent.crt", tls_key_file="/nonexistent/agent.key"
    )
    with pytest.raises(TlsConfigError, match="TUNEFORGE_TLS_CERT_FILE"):
        Agent(settings)


async def _ready_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    output: list[str] = []
    async with asyncio.timeout(60):
        while line := (await proc.stdout.readline()).decode():
            if line.startswith("TUNEFORGE_READY"):
                return line.strip()
            output.append(line)
    raise AssertionError(f"the gateway exited ({await proc.wait()}) without a TUNEFORGE_READY line:\n{''.join(output)}")


async def test_gateway_serves_https_to_clients_without_certificates_and_reaches_mtls_services(
    pki: Pki, tmp_path: Path
) -> None:
    async with grpc_server(pki.server(require_client_cert=True)) as address:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")} | {
            "TUNEFORGE_GATEWAY_PORT": "0",
            "TUNEFORGE_CATALOG_ADDRESS": address,
            "TUNEFORGE_JOBS_ADDRESS": address,
            "TUNEFORGE_GATEWAY_UPLOAD_DIR": str(tmp_path / "uploads"),
            "TUNEFORGE_TLS_CERT_FILE": str(pki.client_cert),
            "TUNEFORGE_TLS_KEY_FILE": str(pki.client_key),
            "TUNEFORGE_TLS_CA_FILE": str(pki.ca),
            "TUNEFORGE_TLS_REQUIRE_CLIENT_CERT": "true",
            "TUNEFORGE_SERVICE_TOKEN": "tls-test-service-token",  # services refuse to start without one
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tuneforge_gateway",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            ready = await _ready_line(proc)
            assert ready.startswith("TUNEFORGE_READY gateway https=")
            port = int(ready.rsplit("=", 1)[1])
            # A browser: trusts the CA, has no client certificate.
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki.ca))) as client:
                resp = await client.get(f"https://127.0.0.1:{port}/healthz", timeout=10)
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"status": "ok", "services": {"catalog": "SERVING", "jobs": "SERVING"}}
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
