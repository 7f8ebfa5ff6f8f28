"""forkcore: virtual-actor (grain) RPC in which one client talks to many servers."""

from typing import Any

from . import errors, interfaces
from .client.client import Client
from .client.views import ServerView
from .config import Config, load_config
from .context import call_context, current_context
from .grains import (
    Affinity,
    AffinityMode,
    Grain,
    GrainId,
    GrainInterface,
    InterfaceInfo,
    reentrant,
    rpc,
)
from .hookspecs import hookimpl
from .interceptors import CallInfo
from .protocol.codec import WireTypeError, wire_type
from .security import Identity, Role, current_caller, requires_role
from .server.server import Server

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`forkcore.testing` loads on first use: `import forkcore` does not import pytest."""
    if name == "testing":
        import importlib

        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module 'forkcore' has no attribute {name!r}")

__all__ = [
    "Affinity",
    "AffinityMode",
    "CallInfo",
    "Client",
    "Config",
    "Grain",
    "GrainId",
    "GrainInterface",
    "Identity",
    "InterfaceInfo",
    "Role",
    "Server",
    "ServerView",
    "WireTypeError",
    "call_context",
    "current_caller",
    "current_context",
    "errors",
    "hookimpl",
    "interfaces",
    "load_config",
    "reentrant",
    "requires_role",
    "rpc",
    "wire_type",
]
