"""The typed failures of forkcore's public API.

Every public failure is one of these, and its message says what to do about it.
"""

from __future__ import annotations


class ForkcoreError(Exception):
    """Base class of every error forkcore raises on purpose."""


class ConfigError(ForkcoreError):
    """A configuration file, option or argument is wrong; the message names which."""


class PluginNotFound(ConfigError):
    """A plugin name is not installed; the message lists what is and what to install."""


class ConnectError(ForkcoreError):
    """No connection could be made, or a connection died with the call on it."""


class NoServerAvailable(ForkcoreError):
    """No connected server can serve the call right now."""


class RequestTimeout(ForkcoreError):
    """A call did not complete before its deadline."""


class RemoteError(ForkcoreError):
    """The grain raised an exception; `type_name` and `message` describe it, and
    `traceback` is the server's traceback text when the server runs with `debug = true`
    (None otherwise: tracebacks can show a server's internals)."""

    def __init__(self, type_name: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"grain raised {type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str | None]]:
        return (type(self), (self.type_name, self.message, self.traceback))


class MethodNotFound(ForkcoreError):
    """The server hosts no such interface or method."""


class ProtocolError(ForkcoreError):
    """A peer sent bytes that break the protocol; that one connection is closed."""


class Unauthorized(ForkcoreError):
    """The caller is not allowed to connect or to call this method."""


__all__ = [
    "ConfigError",
    "ConnectError",
    "ForkcoreError",
    "MethodNotFound",
    "NoServerAvailable",
    "PluginNotFound",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "Unauthorized",
]
