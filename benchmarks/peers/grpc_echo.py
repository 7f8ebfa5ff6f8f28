"""Peer: grpc.aio unary calls with protobuf messages.

The stubs are generated when the module starts, with grpc_tools.protoc, from
forkcore_bench_echo.proto beside this file into a temporary directory (no network).
One channel per client; calls in flight share it, as gRPC clients do.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import itertools
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .._load import AsyncCall, payload, peer_main

PROTO = Path(__file__).with_name("forkcore_bench_echo.proto")
MAX_MESSAGE = 64 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
           ("grpc.max_receive_message_length", MAX_MESSAGE)]


def stubs() -> tuple[Any, Any]:
    """(messages module, services module), generated into a temporary directory."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="forkcore-bench-grpc-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}",
                        f"--grpc_python_out={out}", PROTO.name])
    if code != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {PROTO} (exit {code})")
    sys.path.insert(0, out)
    return (importlib.import_module("forkcore_bench_echo_pb2"),
            importlib.import_module("forkcore_bench_echo_pb2_grpc"))


async def serve(args: argparse.Namespace, ready: Any) -> None:
    import grpc

    pb2, pb2_grpc = stubs()

    class Servicer(pb2_grpc.EchoServicer):  # type: ignore[misc,name-defined]
        async def Echo(self, request: Any, context: Any) -> Any:
            return pb2.EchoReply(n=request.n, s=request.s)

    server = grpc.aio.server(options=OPTIONS)
    pb2_grpc.add_EchoServicer_to_server(Servicer(), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    ready(f"{args.host}:{port}")
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(None)


@asynccontextmanager
async def client(args: argparse.Namespace) -> AsyncIterator[AsyncCall]:
    import grpc

    pb2, pb2_grpc = stubs()
    text = payload(args.payload)
    ids = itertools.count()
    request = pb2.EchoRequest
    async with grpc.aio.insecure_channel(args.endpoint, options=OPTIONS) as channel:
        echo = pb2_grpc.EchoStub(channel).Echo

        async def call() -> Any:
            reply = await echo(request(n=next(ids), s=text))
            return reply.s

        yield call


def main() -> int:
    return peer_main(__doc__ or "", serve, client, backends=("asyncio",))


if __name__ == "__main__":
    raise SystemExit(main())
