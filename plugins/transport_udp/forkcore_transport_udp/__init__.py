"""forkcore's reliable UDP transport: QUIC (aioquic, sans-IO) driven from anyio.

Delivery modes map onto QUIC: `reliable` frames share one long stream, each
`reliable_unordered` message has a stream of its own, and `unreliable` / `sequenced`
messages are DATAGRAM frames. See docs/transports.md.
"""

from .transport import UdpTransport

__all__ = ["UdpTransport"]
