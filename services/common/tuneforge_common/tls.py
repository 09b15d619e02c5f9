"""TLS for the services' gRPC servers and channels, and mTLS between services when client certificates are required.

One TlsConfig per process, built from the TUNEFORGE_TLS_* settings. Every file it names is read and checked when
the process starts (TlsConfig.from_settings), so a wrong path or a key that doesn't fit its certificate stops the
service with the setting's name, rather than surfacing later as a failed handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .config import CommonSettings

CERT_SETTING = "TUNEFORGE_TLS_CERT_FILE"
KEY_SETTING = "TUNEFORGE_TLS_KEY_FILE"
CA_SETTING = "TUNEFORGE_TLS_CA_FILE"
REQUIRE_CLIENT_CERT_SETTING = "TUNEFORGE_TLS_REQUIRE_CLIENT_CERT"


class TlsConfigError(ValueError):
    """A TLS setting that can't work; the message starts with the setting to fix."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = False

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> TlsConfig:
        """The settings' TLS, checked now (files readable, key fits certificate), so a mistake fails the start."""
        tls = cls(
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
            ca_file=settings.tls_ca_file,
            require_client_cert=settings.tls_require_client_cert,
        )
        tls.check()
        return tls

    @property
    def enabled(self) -> bool:
        """Servers listen with TLS (and clients present this certificate) when a certificate and key are set."""
        return bool(self.cert_file and self.key_file)

    @property
    def dials_tls(self) -> bool:
        """Channels use TLS when this process has a certificate, or only a CA (a client such as a GPU node's agent
        that verifies the servers it dials but has no certificate of its own)."""
        return self.enabled or bool(self.ca_file)

    def check(self) -> None:
        """Raise TlsConfigError, naming the setting, unless every configured file is usable and the set is whole."""
        if self.cert_file or self.key_file:
            check_cert_and_key(self.cert_file, self.key_file)
        if self.require_client_cert and not self.enabled:
            raise TlsConfigError(
                f"{REQUIRE_CLIENT_CERT_SETTING} is on but {CERT_SETTING} and {KEY_SETTING} are not set: "
                "mTLS needs this service's own certificate and key"
            )
        if self.require_client_cert and not self.ca_file:
            raise TlsConfigError(
                f"{REQUIRE_CLIENT_CERT_SETTING} is on but {CA_SETTING} is empty: "
                "it names the CA that client certificates must be signed by"
            )
        if self.ca_file:
            _check_ca(self.ca_file)


def check_cert_and_key(
    cert_file: str, key_file: str, cert_setting: str = CERT_SETTING, key_setting: str = KEY_SETTING
) -> None:
    """Both set, readable, PEM, and the key the certificate's own; errors name the setting at fault."""
    if not cert_file or not key_file:
        missing, given = (key_setting, cert_setting) if cert_file else (cert_setting, key_setting)
        raise TlsConfigError(f"{missing} is empty but {given} is set: TLS needs both a certificate and its key")
    _read(cert_file, cert_setting)
    _read(key_file, key_setting)
    # The password callback keeps OpenSSL from prompting on a terminal for an encrypted key (which gRPC can't use).
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{cert_setting}={cert_file}, {key_setting}={key_file}: not a PEM certificate and its own unencrypted "
            f"private key ({exc.reason or exc})"
        ) from None


def _check_ca(ca_file: str) -> None:
    _read(ca_file, CA_SETTING)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{CA_SETTING}={ca_file}: not PEM CA certificates ({exc.reason or exc})") from None


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting}={path}: cannot read it ({exc.strerror or exc})") from None


def server_credentials(tls: TlsConfig | None) -> grpc.ServerCredentials | None:
    """A gRPC server's TLS credentials; None when TLS is off. With require_client_cert the handshake demands a
    client certificate signed by ca_file (mTLS)."""
    if tls is None or not tls.enabled:
        return None
    tls.check()
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, KEY_SETTING), _read(tls.cert_file, CERT_SETTING))],
        root_certificates=_read(tls.ca_file, CA_SETTING) if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert,
    )


# gRPC's own reconnect backoff (1 s growing by 1.6x to 120 s) fails calls fast while it waits, so after a server's
# restart of some 20 s a client would wait about 10 s more before its channel even tried to connect: long enough
# for an agent to miss its lease. Capped here, the caller's own jittered retry decides the pace.
RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def open_channel(
    address: str,
    *,
    tls: TlsConfig | None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to another service: TLS verifying the server against ca_file (the system roots when it is empty),
    presenting this process's certificate when it has one (for servers that require client certificates);
    plaintext when TLS is not configured. A channel whose server went away (a restart) tries again within
    RECONNECT_OPTIONS' few seconds, instead of gRPC's default backoff that grows to two minutes; `options` win."""
    options = list({**dict(RECONNECT_OPTIONS), **dict(options)}.items())
    if tls is None or not tls.dials_tls:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=list(interceptors))
    tls.check()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, CA_SETTING) if tls.ca_file else None,
        private_key=_read(tls.key_file, KEY_SETTING) if tls.enabled else None,
        certificate_chain=_read(tls.cert_file, CERT_SETTING) if tls.enabled else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=list(options), interceptors=list(interceptors))
