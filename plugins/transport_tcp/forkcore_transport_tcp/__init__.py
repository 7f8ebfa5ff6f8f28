"""forkcore's TCP transport: length-prefixed frames over anyio TCP streams."""

from .transport import TcpTransport

__all__ = ["TcpTransport"]
