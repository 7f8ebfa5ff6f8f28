"""Peer: bare asyncio.Protocol, length-prefixed cbor2 frames, coalesced writes.

No streams, no tasks per connection: `data_received` decodes frames and queues answers,
and one `call_soon` per loop turn writes everything queued with one `transport.write`.
The client does the same with futures. About the ceiling of Python here; asyncio only
(with uvloop's loop when the runner's backend is `uvloop`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2

from .._load import AsyncCall, payload, peer_main
from ._frames import HEADER, Decoder, nodelay, split


class _Coalescing(asyncio.Protocol):
    """Queue frames; flush them in one write at the end of the loop turn."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.scheduled = False
        self.decoder = Decoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        nodelay(transport.get_extra_info("socket"))

    def queue(self, body: bytes) -> None:
        self.out.append(HEADER.pack(len(body)))
        self.out.append(body)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()


class EchoServer(_Coalescing):
    def data_received(self, data: bytes) -> None:
        loads, dumps, queue = cbor2.loads, cbor2.dumps, self.queue
        for body in self.decoder.feed(data):
            rid, n, s = loads(body)
            queue(dumps([rid, n, s]))


class EchoClient(_Coalescing):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future[Any]] = {}

    def data_received(self, data: bytes) -> None:
        loads, pending = cbor2.loads, self.pending
        for body in self.decoder.feed(data):
            rid, _n, s = loads(body)
            fut = pending.pop(rid)
            if not fut.done():
                fut.set_result(s)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        self.pending.clear()


async def serve(args: argparse.Namespace, ready: Any) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoServer, args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    ready(f"{args.host}:{port}")
    async with server:
        await server.serve_forever()


@asynccontextmanager
async def client(args: argparse.Namespace) -> AsyncIterator[AsyncCall]:
    loop = asyncio.get_running_loop()
    host, port = split(args.endpoint)
    transport, proto = await loop.create_connection(EchoClient, host, port)
    text = payload(args.payload)
    ids = itertools.count()
    dumps, create_future, pending, queue = cbor2.dumps, loop.create_future, proto.pending, \
        proto.queue

    async def call() -> Any:
        rid = next(ids)
        fut = create_future()
        pending[rid] = fut
        queue(dumps([rid, rid, text]))
        return await fut

    try:
        yield call
    finally:
        transport.close()


def main() -> int:
    return peer_main(__doc__ or "", serve, client, backends=("asyncio", "uvloop"))


if __name__ == "__main__":
    raise SystemExit(main())
