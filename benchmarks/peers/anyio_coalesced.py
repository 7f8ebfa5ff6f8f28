"""Peer: raw anyio TCP, length-prefixed cbor2 frames, writes of one loop turn coalesced.

Each side queues outgoing frames in a list and wakes a writer task, which sends
everything queued in one `send`: the frames produced during one turn of the event loop
leave in one system call. Same frames as `anyio_send`; only the writing differs. This is
the design forkcore's StreamChannel uses, without forkcore's protocol around it.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import cbor2
from anyio.abc import SocketAttribute

from .._load import AsyncCall, payload, peer_main
from ._frames import HEADER, Decoder, nodelay, split

_CLOSED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Writer:
    """Frames queued during a loop turn go out in one send."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.pending: list[bytes] = []
        self.wake = anyio.Event()

    def send(self, body: bytes) -> None:
        self.pending.append(HEADER.pack(len(body)))
        self.pending.append(body)
        self.wake.set()

    async def run(self) -> None:
        pending = self.pending
        try:
            while True:
                if not pending:
                    self.wake = anyio.Event()
                    await self.wake.wait()
                    continue
                data = b"".join(pending)
                pending.clear()
                await self.stream.send(data)
        except _CLOSED:
            pass


async def serve(args: argparse.Namespace, ready: Any) -> None:
    listener = await anyio.create_tcp_listener(local_host=args.host, local_port=args.port)
    ready(f"{args.host}:{listener.extra(SocketAttribute.local_port)}")

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nodelay(stream.extra(SocketAttribute.raw_socket))
        decoder = Decoder()
        writer = Writer(stream)
        loads, dumps = cbor2.loads, cbor2.dumps
        send = writer.send
        async with stream, anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            try:
                while True:
                    for body in decoder.feed(await stream.receive()):
                        rid, n, s = loads(body)
                        send(dumps([rid, n, s]))
            except _CLOSED:
                pass
            tg.cancel_scope.cancel()

    await listener.serve(handle)


@asynccontextmanager
async def client(args: argparse.Namespace) -> AsyncIterator[AsyncCall]:
    host, port = split(args.endpoint)
    stream = await anyio.connect_tcp(host, port)
    nodelay(stream.extra(SocketAttribute.raw_socket))
    writer = Writer(stream)
    pending: dict[int, list[Any]] = {}
    text = payload(args.payload)
    ids = itertools.count()
    dumps, loads = cbor2.dumps, cbor2.loads
    send = writer.send

    async def reader() -> None:
        decoder = Decoder()
        try:
            while True:
                for body in decoder.feed(await stream.receive()):
                    rid, _n, s = loads(body)
                    slot = pending.pop(rid)
                    slot[1] = s
                    slot[0].set()
        except _CLOSED:
            pass

    async def call() -> Any:
        rid = next(ids)
        slot: list[Any] = [anyio.Event(), None]
        pending[rid] = slot
        send(dumps([rid, rid, text]))
        await slot[0].wait()
        return slot[1]

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer.run)
        try:
            yield call
        finally:
            tg.cancel_scope.cancel()
            await stream.aclose()


def main() -> int:
    return peer_main(__doc__ or "", serve, client)


if __name__ == "__main__":
    raise SystemExit(main())
