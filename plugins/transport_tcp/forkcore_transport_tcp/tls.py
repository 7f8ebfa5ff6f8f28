"""TLS for transport `tcp`: option checking, SSL contexts, and the client's checks.

Server: `cert_file` + `key_file` (PEM) turn TLS on; TLS 1.3 only, ALPN "forkcore/1".
Client: `ca_file` (verify chain and host name against that CA bundle), `fingerprint`
(pin the SHA-256 of the server's DER certificate), `insecure` (no verification), `tls`
(TLS with the system CA store). Everything that can be checked without a peer is checked
when the transport is built, so a bad option is a `ConfigError` before anything connects.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any

from forkcore.errors import ConfigError, ConnectError
from forkcore.security import certificate_fingerprint, parse_fingerprint

ALPN = "forkcore/1"
MIN_VERSION = ssl.TLSVersion.TLSv1_3

_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----\s*.+?-----END CERTIFICATE-----", re.DOTALL
)


def normalize_fingerprint(value: Any) -> str:
    """`value` as 64 lower-case hex digits, or a `ConfigError` naming the option."""
    if not isinstance(value, str):
        raise ConfigError(f"transport_options.fingerprint must be a string of 64 hex digits "
                          f"(colons optional), not {type(value).__name__}")
    try:
        return parse_fingerprint(value)
    except ValueError:
        raise ConfigError(f"transport_options.fingerprint {value!r} is not a SHA-256 "
                          "fingerprint: it must be 64 hex digits (colons optional), as "
                          "`openssl x509 -noout -fingerprint -sha256 -in cert.pem` prints "
                          "it") from None


def _path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"transport_options.{name} must be a file path (string), not "
                          f"{type(value).__name__ if value != '' else 'an empty string'}")
    try:
        with open(value, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(f"transport_options.{name}: cannot read {value!r}: "
                          f"{exc.strerror or exc}") from None
    return value


def _bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"transport_options.{name} must be true or false, not "
                      f"{type(value).__name__}")


def positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"transport_options.{name} must be a positive number of seconds, "
                          f"not {value!r}")
    return float(value)


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = MIN_VERSION
    context.set_alpn_protocols([ALPN])
    return context


def _no_password() -> bytes:
    raise ValueError("encrypted private keys are not supported")


def server_context(cert_file: Any, key_file: Any) -> tuple[ssl.SSLContext, str] | None:
    """The listener's SSL context and its certificate's fingerprint; None for plain TCP."""
    cert = _path("cert_file", cert_file)
    key = _path("key_file", key_file)
    if cert is None:
        if key is not None:
            raise ConfigError("transport_options.key_file was given without cert_file; give "
                              "both (PEM certificate chain and its private key) for TLS")
        return None
    with open(cert, "rb") as file:
        match = _PEM_CERT.search(file.read().decode("ascii", "replace"))
    if match is None:
        raise ConfigError(f"transport_options.cert_file {cert!r} holds no PEM certificate "
                          "('-----BEGIN CERTIFICATE-----')")
    try:
        der = ssl.PEM_cert_to_DER_cert(match.group(0))
    except ValueError as exc:
        raise ConfigError(f"transport_options.cert_file {cert!r}: {exc}") from None
    context = _base_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ValueError:  # our password callback: the key is encrypted
        raise ConfigError(f"transport_options.key_file {key or cert!r} is encrypted; "
                          "decrypt it (openssl pkey -in key.pem -out plain.pem)") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if key is None:
            raise ConfigError(f"transport_options.key_file is required with cert_file "
                              f"(cert_file {cert!r} holds no usable private key: "
                              f"{reason})") from None
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"transport_options.key_file {key!r} is not the private key of "
                              f"cert_file {cert!r}") from None
        raise ConfigError(f"transport_options.cert_file {cert!r} / key_file {key!r} cannot "
                          f"be loaded: {reason}") from None
    return context, certificate_fingerprint(der)


@dataclass(frozen=True)
class ClientTls:
    """How a client speaks TLS: its context, what it checks, and what it tells the user."""

    context: ssl.SSLContext
    ca_file: str | None
    fingerprint: str | None
    insecure: bool
    server_name: str | None

    def hostname(self, host: str) -> str | None:
        """The name the certificate is checked against (and sent as SNI)."""
        return self.server_name or host

    def check(self, endpoint: str, ssl_object: ssl.SSLObject) -> None:
        """After the handshake: the pinned fingerprint and the ALPN protocol."""
        if self.fingerprint is not None:
            der = ssl_object.getpeercert(binary_form=True)
            actual = certificate_fingerprint(der) if der else "no certificate"
            if actual != self.fingerprint:
                raise ConnectError(
                    f"certificate of {endpoint} does not match the pinned fingerprint "
                    f"{self.fingerprint}: got {actual} (transport_options.fingerprint)")
        selected = ssl_object.selected_alpn_protocol()
        if selected is not None and selected != ALPN:
            raise ConnectError(f"{endpoint} negotiated ALPN protocol {selected!r}, not "
                               f"{ALPN!r}: it is not a forkcore server")

    def describe_verify_failure(self, endpoint: str, exc: ssl.SSLCertVerificationError) -> str:
        against = f"ca_file {self.ca_file!r}" if self.ca_file else "the system CA store"
        message = exc.verify_message or exc.reason or str(exc)
        return (f"TLS handshake with {endpoint} failed: certificate verify failed: {message} "
                f"(checked against {against})")


def client_tls(ca_file: Any = None, fingerprint: Any = None, insecure: Any = False,
               tls: Any = None, server_name: Any = None) -> ClientTls | None:
    """The client's TLS settings from its options; None for plain TCP."""
    ca = _path("ca_file", ca_file)
    pinned = normalize_fingerprint(fingerprint) if fingerprint is not None else None
    no_verify = bool(_bool("insecure", insecure))
    wanted = _bool("tls", tls)
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        raise ConfigError("transport_options.server_name must be a non-empty host name")
    implied = [name for name, on in (("ca_file", ca is not None),
                                     ("fingerprint", pinned is not None),
                                     ("insecure", no_verify)) if on]
    if wanted is False:
        if implied:
            raise ConfigError(f"transport_options.tls = false contradicts "
                              f"{' and '.join(implied)}, which need TLS")
        return None
    if wanted is None and not implied:
        if server_name is not None:
            raise ConfigError("transport_options.server_name needs TLS (tls = true, ca_file "
                              "or fingerprint)")
        return None
    if ca is not None:
        try:  # only this bundle is trusted, not the system store
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"transport_options.ca_file {ca!r} holds no usable PEM CA "
                              f"certificate: {getattr(exc, 'reason', None) or exc}") from None
        context.minimum_version = MIN_VERSION
        context.set_alpn_protocols([ALPN])
    elif pinned is not None or no_verify:
        context = _base_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = _base_context(ssl.Purpose.SERVER_AUTH)  # the system CA store
    return ClientTls(context, ca, pinned, no_verify and ca is None and pinned is None,
                     server_name)
