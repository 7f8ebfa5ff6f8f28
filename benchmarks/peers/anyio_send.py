"""Peer: raw anyio TCP, length-prefixed cbor2 frames, one send per frame.

The server answers each frame with its own `send` as soon as it is decoded; the client's
calls take turns (a lock) to send their frame. No coalescing anywhere: every frame costs
one system call on each side. This is what a straightforward anyio protocol does.
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
from ._frames import Decoder, frame, nodelay, split

_CLOSED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


async def serve(args: argparse.Namespace, ready: Any) -> None:
    listener = await anyio.create_tcp_listener(local_host=args.host, local_port=args.port)
    ready(f"{args.host}:{listener.extra(SocketAttribute.local_port)}")

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nodelay(stream.extra(SocketAttribute.raw_socket))
        decoder = Decoder()
        loads, dumps = cbor2.loads, cbor2.dumps
        async with stream:
            try:
                while True:
                    for body in decoder.feed(await stream.receive()):
                        rid, n, s = loads(body)
                        await stream.send(frame(dumps([rid, n, s])))
            except _CLOSED:
                pass

    await listener.serve(handle)


@asynccontextmanager
async def client(args: argparse.Namespace) -> AsyncIterator[AsyncCall]:
    host, port = split(args.endpoint)
    stream = await anyio.connect_tcp(host, port)
    nodelay(stream.extra(SocketAttribute.raw_socket))
    pending: dict[int, list[Any]] = {}
    lock = anyio.Lock()
    text = payload(args.payload)
    ids = itertools.count()
    dumps, loads = cbor2.dumps, cbor2.loads

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
        data = frame(dumps([rid, rid, text]))
        async with lock:
            await stream.send(data)
        await slot[0].wait()
        return slot[1]

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        try:
            yield call
        finally:
            tg.cancel_scope.cancel()
            await stream.aclose()


def main() -> int:
    return peer_main(__doc__ or "", serve, client)


if __name__ == "__main__":
    raise SystemExit(main())
