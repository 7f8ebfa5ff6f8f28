"""Peer: Pyro5 (threaded server, serpent serializer, its defaults).

Pyro5 is synchronous: the client runs one thread, with its own proxy (connection), per
call in flight; the server's thread pool serves each connection in a thread.
"""

from __future__ import annotations

import argparse
import itertools
import threading
from collections.abc import Callable
from typing import Any

from .._load import payload, peer_main


def serve(args: argparse.Namespace, ready: Any) -> None:
    import Pyro5.api

    @Pyro5.api.expose
    class Echo:
        def echo(self, n: int, s: str) -> tuple[int, str]:
            return n, s

    daemon = Pyro5.api.Daemon(host=args.host, port=args.port)
    uri = daemon.register(Echo, "bench.echo")
    ready(str(uri))
    daemon.requestLoop()


def thread_client(args: argparse.Namespace) -> Callable[[], Callable[[], Any]]:
    import Pyro5.api

    text = payload(args.payload)
    ids = itertools.count()

    def new_caller() -> Callable[[], Any]:
        proxy = Pyro5.api.Proxy(args.endpoint)
        proxy._pyroBind()
        owner = [threading.get_ident()]
        echo = proxy.echo

        def call() -> Any:
            if owner[0] != threading.get_ident():
                proxy._pyroClaimOwnership()
                owner[0] = threading.get_ident()
            return echo(next(ids), text)[1]

        return call

    return new_caller


def main() -> int:
    return peer_main(__doc__ or "", serve, thread_client=thread_client, async_serve=False,
                     backends=("threads",))


if __name__ == "__main__":
    raise SystemExit(main())
