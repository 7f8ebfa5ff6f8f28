"""forkcore: virtual-actor (grain) RPC in which one client talks to many servers."""

from . import errors
from .client.client import Client
from .client.views import ServerView
from .config import Config, load_config
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
from .protocol.codec import WireTypeError, wire_type
from .security import Identity, Role, current_caller, requires_role
from .server.server import Server

__version__ = "0.1.0"

__all__ = [
    "Affinity",
    "AffinityMode",
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
    "current_caller",
    "errors",
    "hookimpl",
    "load_config",
    "reentrant",
    "requires_role",
    "rpc",
    "wire_type",
]
