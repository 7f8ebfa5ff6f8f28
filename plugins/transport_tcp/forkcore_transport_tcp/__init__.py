"""forkcore's TCP transport: length-prefixed frames over anyio TCP streams, optionally in TLS."""

from .transport import TcpTransport

__all__ = ["TcpTransport"]
