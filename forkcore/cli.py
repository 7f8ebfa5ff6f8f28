"""The `forkcore` command: serve, call, status, plugins, demo.

Errors are one line on stderr and a non-zero exit status; `--debug` adds tracebacks and
debug logs. `call` prints its JSON result, and nothing else, on stdout.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from .client.views import ServerView
from .clock import now as clock
from .errors import ConfigError, ForkcoreError
from .report import render_servers, routing_shares

log = logging.getLogger("forkcore.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkcore", description="Virtual-actor RPC: one client, many servers.")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio",
                        help="event loop: asyncio (default), uvloop (pip install "
                             "'forkcore[uvloop]'; faster) or trio")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the [server] of a configuration file")
    serve.add_argument("-c", "--config", required=True, metavar="FILE")

    call = sub.add_parser("call", help="one dynamic call through the [client] of FILE")
    call.add_argument("-c", "--config", required=True, metavar="FILE")
    call.add_argument("interface", help="the interface's wire name")
    call.add_argument("key", help="grain key: a JSON int or string, else taken as a string")
    call.add_argument("method")
    call.add_argument("args", nargs="*", metavar="ARG", help="arguments, each JSON")

    status = sub.add_parser("status", help="the client's view of its servers")
    status.add_argument("-c", "--config", required=True, metavar="FILE")
    status.add_argument("--watch", action="store_true",
                        help="refresh a live table until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between refreshes with --watch (default 1)")
    status.add_argument("--count", type=int, default=0, metavar="N",
                        help="with --watch, stop after N refreshes (default: never)")

    sub.add_parser("plugins", help="every registered plugin and its distribution")
    demo = sub.add_parser("demo", help="servers and a client in one process, no file needed")
    demo.add_argument("--players", type=int, default=300,
                      help="player grains in the workload (default 300)")
    return parser


LOOPS = ("asyncio", "uvloop", "trio")


def run(args: argparse.Namespace, fn: Any, *fn_args: Any) -> Any:
    """`anyio.run(fn, *fn_args)` on the event loop chosen with `--loop`."""
    loop = getattr(args, "loop", "asyncio")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ConfigError("--loop uvloop needs uvloop: pip install 'forkcore[uvloop]' "
                              "(Linux and macOS)") from None
        return anyio.run(fn, *fn_args, backend="asyncio",
                         backend_options={"use_uvloop": True})
    if loop == "trio":
        try:
            import trio  # noqa: F401
        except ImportError:
            raise ConfigError("--loop trio needs trio: pip install trio") from None
    return anyio.run(fn, *fn_args, backend=loop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.debug else (
        logging.INFO if args.command == "serve" else logging.WARNING)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except ForkcoreError as exc:
        if args.debug:
            trace = getattr(exc, "traceback", None)
            if isinstance(trace, str) and trace:
                print(f"forkcore: the server's traceback:\n{trace.rstrip()}", file=sys.stderr)
            raise
        print(f"forkcore: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"forkcore: unexpected error: {type(exc).__name__}: {exc} (run with --debug "
              "for a traceback)", file=sys.stderr)
        return 2


# -- serve ------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.server import Server

    config_dir = str(Path(args.config).resolve().parent)
    for path in (os.getcwd(), config_dir):
        if path not in sys.path:
            sys.path.insert(0, path)
    server = Server.from_config(args.config)
    run(args, _serve, server)
    return 0


async def _serve(server: Any) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with server:
            print(f"forkcore: serving {server.id} on {server.endpoint} "
                  f"({server.options.transport}); interfaces: "
                  f"{', '.join(server.interfaces) or 'none'}", flush=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve_forever)
                async for signum in signals:
                    log.info("received %s: draining and stopping",
                             signal.Signals(signum).name)
                    break
                tg.cancel_scope.cancel()


# -- call -------------------------------------------------------------------------------


def parse_key(text: str) -> Any:
    """A JSON int or string becomes that; anything else is the raw string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | str) and not isinstance(value, bool) else text


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    if attrs.has(type(value)):
        return attrs.asdict(value)
    raise TypeError(f"cannot show a {type(value).__name__} as JSON")


def _cmd_call(args: argparse.Namespace) -> int:
    from .client.client import Client

    values = []
    for i, text in enumerate(args.args, 1):
        try:
            values.append(json.loads(text))
        except ValueError:
            raise ConfigError(f"argument {i} ({text!r}) is not JSON; quote strings as "
                              "'\"text\"'") from None
    client = Client.from_config(args.config)

    async def call_once() -> Any:
        async with client:
            return await client.call(args.interface, parse_key(args.key), args.method, *values)

    result = run(args, call_once)
    print(json.dumps(result, default=_json_default))
    return 0


# -- status -----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    from .client.client import Client

    if args.interval <= 0 or args.count < 0:
        raise ConfigError("--interval must be > 0 and --count >= 0")
    client = Client.from_config(args.config)
    run(args, _status, client, args)
    return 0


async def _status(client: Any, args: argparse.Namespace) -> None:
    live = args.watch and sys.stdout.isatty()
    if sys.stderr.isatty():
        print(f"connecting to {len(client.options.servers)} server(s)...", file=sys.stderr)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with client, anyio.create_task_group() as tg:
            async def stop_on_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()

            tg.start_soon(stop_on_signal)
            previous: dict[str, dict[str, Any]] = {}
            last = clock()
            await anyio.sleep(min(0.2, client.options.health.heartbeat_interval))
            frames = 0
            while True:
                stats = await client.server_stats()
                now = clock()
                print(("\x1b[H\x1b[2J" if live else "")
                      + status_table(client, stats, previous, now - last), flush=True)
                previous, last, frames = stats, now, frames + 1
                if not args.watch or (args.count and frames >= args.count):
                    break
                if not live:
                    print(flush=True)
                await anyio.sleep(args.interval)
            tg.cancel_scope.cancel()


def status_table(client: Any, stats: dict[str, dict[str, Any]],
                 previous: dict[str, dict[str, Any]], elapsed: float) -> str:
    """The status table: the demo's server table plus the servers' own counters."""
    rates = {}
    for sid, values in stats.items():
        before = previous.get(sid)
        if before is not None and elapsed > 0:
            rates[sid] = f"{max(0, values['calls'] - before['calls']) / elapsed:.0f}"
    interfaces = sorted({i for v in client.servers for i in v.interfaces})
    down = [ServerView(id="?", endpoint=endpoint, state="unreachable", last_error=error)
            for endpoint, error in client.unreachable.items()]
    table = render_servers([*client.servers, *down], {
        "CALLS": {sid: str(v.get("calls", "-")) for sid, v in stats.items()},
        "CALLS/S": rates,
        "GRAINS": {sid: str(v.get("activations", "-")) for sid, v in stats.items()},
        "ROUTED": routing_shares(client.route, interfaces),
    })
    return (f"{table}\n\nmode {client.mode}; CALLS and GRAINS: served and active on each "
            "server; ROUTED: where 1,000 sample keys of each interface go now")


# -- plugins ----------------------------------------------------------------------------


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import KINDS, registrations

    rows = [("KIND", "NAME", "DISTRIBUTION")]
    for kind in KINDS:
        rows.extend((kind, r.name, r.source) for r in registrations(kind))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


# -- demo -------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.players < 1:
        raise ConfigError("--players must be at least 1")
    run(args, run_demo, args.players)
    return 0


_COMMANDS = {
    "serve": _cmd_serve,
    "call": _cmd_call,
    "status": _cmd_status,
    "plugins": _cmd_plugins,
    "demo": _cmd_demo,
}

if __name__ == "__main__":
    raise SystemExit(main())
