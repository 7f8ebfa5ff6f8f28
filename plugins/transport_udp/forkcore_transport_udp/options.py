"""The `transport_options` of transport `udp`: declared once, checked once.

Every option has a type, a default and a check; a bad value is a `ConfigError` naming the
option, raised when the transport is built (so before anything connects).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from forkcore.errors import ConfigError
from forkcore.protocol.framing import DEFAULT_MAX_FRAME_SIZE
from forkcore.security import parse_fingerprint

Check = Callable[[Any], str | None]


def _positive(v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a positive number"


def _int_at_least(low: int, high: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if v < low or (high is not None and v > high):
            return f"must be an int from {low} to {high}" if high else f"must be an int >= {low}"
        return None
    return check


def _file(v: Any) -> str | None:
    return None if v is None or Path(v).is_file() else f"file {v!r} does not exist"


# name → (types, default, check, doc); docs/transports.md lists the same table.
SPEC: dict[str, tuple[tuple[type, ...], Any, Check | None, str]] = {
    "cert_file": ((str, type(None)), None, _file,
                  "server: PEM certificate (chain); without it a self-signed one is made"),
    "key_file": ((str, type(None)), None, _file,
                 "server: PEM private key of cert_file (may be omitted if cert_file has it)"),
    "ca_file": ((str, type(None)), None, _file,
                "client: PEM CA bundle the server's certificate must chain to"),
    "fingerprint": ((str, type(None)), None, None,
                    "client: hex SHA-256 of the server's certificate (colons optional)"),
    "insecure": ((bool,), False, None,
                 "client: skip certificate verification (development only)"),
    "server_name": ((str, type(None)), None, None,
                    "client: name to check the certificate against with ca_file "
                    "(default: the endpoint's host)"),
    "max_frame_size": ((int,), DEFAULT_MAX_FRAME_SIZE, _int_at_least(64),
                       "largest message body in bytes, both directions"),
    "idle_timeout": ((int, float), 5.0, _positive,
                     "seconds of silence after which the peer is declared gone"),
    "ping_interval": ((int, float), 1.0, _positive,
                      "seconds between QUIC PINGs that keep an idle connection alive"),
    "handshake_timeout": ((int, float), 5.0, _positive,
                          "server: seconds a new connection has to finish its handshake"),
    "max_streams": ((int,), 64, _int_at_least(1, 65536),
                    "reliable_unordered messages a peer may have open at once"),
    "max_pending_datagrams": ((int,), 256, _int_at_least(1),
                              "unsent (and unread) datagram messages kept; the oldest unsent "
                              "is dropped beyond it"),
    "max_handshakes_per_address": ((int,), 32, _int_at_least(1),
                                   "server: handshakes in progress from one IP address"),
    "max_connections": ((int,), 10000, _int_at_least(1),
                        "server: connections (and handshakes) at once"),
    "max_datagram_size": ((int, type(None)), None, _int_at_least(1200, 16384),
                          "bytes of UDP payload per packet; default 1200 (safe on any path), "
                          "16384 to loopback addresses"),
}


@attrs.frozen
class UdpOptions:
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    fingerprint: str | None = None
    insecure: bool = False
    server_name: str | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    idle_timeout: float = 5.0
    ping_interval: float = 1.0
    handshake_timeout: float = 5.0
    max_streams: int = 64
    max_pending_datagrams: int = 256
    max_handshakes_per_address: int = 32
    max_connections: int = 10000
    max_datagram_size: int | None = None

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> UdpOptions:
        unknown = sorted(set(options) - set(SPEC))
        if unknown:
            raise ConfigError(f"unknown udp transport option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(SPEC)}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            types, _default, check, _doc = SPEC[name]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ConfigError(f"transport_options.{name} must be {wanted}, not "
                                  f"{type(value).__name__}")
            complaint = check(value) if check is not None and value is not None else None
            if complaint:
                raise ConfigError(f"transport_options.{name} {complaint}")
            values[name] = value
        if values.get("fingerprint") is not None:
            try:
                values["fingerprint"] = parse_fingerprint(values["fingerprint"])
            except ValueError as exc:
                raise ConfigError(f"transport_options.fingerprint {exc}") from None
        if values.get("key_file") and not values.get("cert_file"):
            raise ConfigError("transport_options.key_file needs cert_file too")
        return cls(**values)
