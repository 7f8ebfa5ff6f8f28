"""Identities, roles, pre-shared-key authentication and the session cipher.

The PSK handshake is a mutual challenge-response: the client sends a fresh nonce Nc and
whether it wants the session encrypted (W: yes unless its channel is encrypted and the
server's certificate verified), the server decides (E = W, or yes if its own channel does
not encrypt) and answers with its own nonce Ns, E and HMAC-SHA256(K, "forkcore/1 server"
| Nc | Ns | W | E | identity), the client checks it and answers HMAC-SHA256(K,
"forkcore/1 client" | Nc | Ns | W | E | identity); both compare in constant time. So a
man in the middle cannot change W or E without the proofs failing, and the client
refuses E = no when it asked for W = yes. With E, keys for the rest of the session are
HKDF-SHA256(K, salt = Nc | Ns, info = "forkcore/1 <direction>"), used with
ChaCha20-Poly1305 and a per-direction frame counter as nonce (docs/security.md).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import string
import struct
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import attrs

from .errors import ConfigError, ProtocolError

F = TypeVar("F", bound=Callable[..., Any])

LABEL = b"forkcore/1 "
NONCE_SIZE = 32
MIN_PSK_BYTES = 16


class Role(IntEnum):
    """Ordered roles: a caller with a role may call what requires that role or a lower one."""

    ANONYMOUS = 0
    GUEST = 1
    USER = 2
    SERVER = 3
    ADMIN = 4

    @classmethod
    def parse(cls, value: Role | str, where: str = "role") -> Role:
        if isinstance(value, Role):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(r.name.lower() for r in cls)
            raise ConfigError(f"{where}: unknown role {value!r}; roles are {names}") from None


@attrs.frozen
class Identity:
    """Who is calling: a name, a role, and how it was established ("none", "psk",
    "token")."""

    name: str
    role: Role
    method: str = "none"

    @property
    def authenticated(self) -> bool:
        return self.method != "none"


ANONYMOUS = Identity("anonymous", Role.ANONYMOUS)

_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("forkcore_caller",
                                                                   default=ANONYMOUS)


def current_caller() -> Identity:
    """The identity of the connection whose call the current grain code is running."""
    return _caller.get()


def set_caller(identity: Identity) -> contextvars.Token[Identity]:
    return _caller.set(identity)


def reset_caller(token: contextvars.Token[Identity]) -> None:
    _caller.reset(token)


def requires_role(role: Role | str) -> Callable[[F], F]:
    """Require at least `role` to call this method (or every method of this interface or
    grain class): `@forkcore.requires_role("admin")`."""
    parsed = Role.parse(role, "requires_role")

    def mark(obj: F) -> F:
        obj.__forkcore_role__ = parsed  # type: ignore[attr-defined]
        return obj

    return mark


def required_role(*holders: Any) -> Role:
    """The highest role required by any of `holders` (classes or functions)."""
    return max((getattr(h, "__forkcore_role__", Role.ANONYMOUS) for h in holders if h),
               default=Role.ANONYMOUS)


# -- pre-shared keys ------------------------------------------------------------------------


def load_psk(psk: str | None, psk_file: str | None, where: str) -> bytes | None:
    """The key from `psk` or `psk_file` (at least 16 bytes), or None if neither is set."""
    if psk is not None and psk_file is not None:
        raise ConfigError(f"{where}: give psk or psk_file, not both")
    if psk_file is not None:
        try:
            key = Path(psk_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{where} key 'psk_file': cannot read {psk_file}: "
                              f"{exc.strerror or exc}") from None
    elif psk is not None:
        key = psk.encode("utf-8")
    else:
        return None
    if len(key) < MIN_PSK_BYTES:
        raise ConfigError(f"{where}: the pre-shared key must be at least {MIN_PSK_BYTES} "
                          f"bytes (got {len(key)}); generate one with "
                          "'python -c \"import secrets; print(secrets.token_urlsafe(32))\"'")
    return key


# -- certificate fingerprints (shared by the TLS transports) --------------------------------


def certificate_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as 64 lower-case hex digits."""
    return hashlib.sha256(der).hexdigest()


def pretty_fingerprint(digest: str) -> str:
    """`AB:CD:...`, the form `openssl x509 -fingerprint -sha256` prints."""
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()


def parse_fingerprint(text: str) -> str:
    """`text` (hex, colons and spaces optional, or as openssl prints it) as 64 lower-case
    hex digits; ValueError if it is no SHA-256 fingerprint."""
    digest = text.strip().lower()
    if digest.startswith("sha256 fingerprint="):  # as openssl prints it
        digest = digest[len("sha256 fingerprint="):]
    digest = digest.replace(":", "").replace(" ", "")
    if digest.startswith("sha256/"):
        digest = digest[len("sha256/"):]
    if len(digest) != 64 or any(c not in string.hexdigits for c in digest):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons "
                         "optional)")
    return digest


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def proof(key: bytes, side: str, client_nonce: bytes, server_nonce: bytes, identity: str,
          *, wanted: bool, encrypted: bool) -> bytes:
    """HMAC-SHA256 proving knowledge of `key`, bound to both nonces, whether the client
    asked for the session to be encrypted (`wanted`), whether the server decided to
    encrypt it (`encrypted`) and the identity."""
    message = LABEL + side.encode() + b"\0" + client_nonce + server_nonce + \
        bytes((wanted, encrypted)) + identity.encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).digest()


def proofs_match(expected: bytes, received: Any) -> bool:
    return isinstance(received, bytes) and hmac.compare_digest(expected, received)


class SessionCipher:
    """ChaCha20-Poly1305 for one connection: one key per direction, frame counters as
    nonces, so a replayed, reordered, dropped or altered frame fails to open."""

    __slots__ = ("_open", "_received", "_seal", "_sent")

    def __init__(self, key: bytes, client_nonce: bytes, server_nonce: bytes,
                 role: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        c2s = _derive(key, client_nonce + server_nonce, b"client->server")
        s2c = _derive(key, client_nonce + server_nonce, b"server->client")
        send, receive = (c2s, s2c) if role == "client" else (s2c, c2s)
        self._seal = ChaCha20Poly1305(send).encrypt
        self._open = ChaCha20Poly1305(receive).decrypt
        self._sent = 0
        self._received = 0

    def seal(self, body: bytes) -> bytes:
        nonce = struct.pack(">4xQ", self._sent)
        self._sent += 1
        return self._seal(nonce, body, None)

    def open(self, body: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        nonce = struct.pack(">4xQ", self._received)
        self._received += 1
        try:
            return self._open(nonce, body, None)
        except InvalidTag:
            raise ProtocolError("a frame failed authentication (tampered, replayed or not "
                                "from the peer that shares the key)") from None


def _derive(key: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=LABEL + info).derive(key)
