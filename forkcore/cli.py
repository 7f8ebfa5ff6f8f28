"""The `forkcore` command: serve, call, status, plugins, demo.

Errors are one line on stderr and exit status 1; a wrong command-line argument is a
usage error (argparse's usage and message, exit status 2). `--debug` adds tracebacks and
debug logs; it and `--loop` go before or after the command. `call` prints its JSON
result, and nothing else, on stdout.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import re
import signal
import sys
import textwrap
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from . import __version__
from .client.views import ServerView
from .clock import now as clock
from .errors import ConfigError, ConnectError, ForkcoreError
from .report import render_servers, routing_shares

log = logging.getLogger("forkcore.cli")


LOOPS = ("asyncio", "uvloop", "trio")


class UsageError(Exception):
    """A command-line argument is wrong: argparse's usage error (exit 2)."""


def _global_flags() -> argparse.ArgumentParser:
    """`--debug` and `--loop`, accepted before or after the subcommand."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("global options (before or after the command)")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="tracebacks and debug logs")
    group.add_argument("--loop", choices=LOOPS, default=argparse.SUPPRESS,
                       help="event loop: asyncio (default), uvloop (pip install "
                            "'forkcore[uvloop]'; faster) or trio")
    return flags


_SUBCOMMANDS: dict[str, argparse.ArgumentParser] = {}


def _command(sub: Any, flags: argparse.ArgumentParser, name: str, summary: str,
             description: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, parents=[flags],
        description=textwrap.fill(f"{summary[:1].upper()}{summary[1:]}. {description}", 80),
        epilog=f"example:\n{example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    _SUBCOMMANDS[name] = parser
    return parser


def _config_arg(parser: argparse.ArgumentParser, table: str) -> None:
    parser.add_argument_group("required arguments").add_argument(
        "-c", "--config", required=True, metavar="FILE",
        help=f"TOML configuration file; its [{table}] table is used")


def _parser() -> argparse.ArgumentParser:
    flags = _global_flags()
    parser = argparse.ArgumentParser(
        prog="forkcore", parents=[flags],
        description="Virtual-actor RPC: one client, many servers.",
        epilog="Run 'forkcore COMMAND --help' for a command's arguments and an example; "
               "docs/getting-started.md for a first application.")
    parser.add_argument("--version", action="version", version=f"forkcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these; 'forkcore COMMAND --help' shows its "
                                     "arguments")

    serve = _command(sub, flags, "serve", "run the [server] of a configuration file",
                     "Hosts the grains of the modules in 'grains' until SIGINT or SIGTERM, "
                     "then drains calls in flight and exits 0.",
                     "  forkcore serve -c server.toml")
    _config_arg(serve, "server")

    call = _command(sub, flags, "call", "one dynamic call through the [client] of FILE",
                    "Prints the JSON result, and nothing else, on stdout; an error is one "
                    "line on stderr.",
                    "  forkcore call -c client.toml counter alice add 5\n"
                    "  forkcore call -c client.toml counter alice add -1\n"
                    "  forkcore call -c client.toml greeter g1 greet '\"world\"'\n"
                    "  forkcore call -c client.toml shop s1 buy '\"apple\"' count=3")
    _config_arg(call, "client")
    call.add_argument("interface", help="the interface's wire name (e.g. counter)")
    call.add_argument("key", help="grain key: a JSON int or string, else taken as a string")
    call.add_argument("method", help="the method to call")
    call.add_argument("args", nargs="*", default=[], metavar="ARG",
                      help="arguments, each JSON (strings quoted: '\"text\"'), or NAME=JSON "
                           "for a keyword argument (after the positional ones); optional")

    status = _command(sub, flags, "status", "the client's view of its servers",
                      "One table: each server's state, RTT, interfaces and its own counters; "
                      "servers that never answered are shown as unreachable.",
                      "  forkcore status -c client.toml\n"
                      "  forkcore status -c client.toml --watch --interval 2")
    _config_arg(status, "client")
    status.add_argument("--watch", action="store_true",
                        help="refresh the table until Ctrl-C, retrying servers that do not "
                             "answer")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between refreshes with --watch (default 1)")
    status.add_argument("--count", type=int, default=None, metavar="N",
                        help="with --watch, stop after N refreshes (default: never)")

    _command(sub, flags, "plugins", "every registered plugin and its distribution",
             "Lists each plugin's kind, name and the distribution that registered it.",
             "  forkcore plugins")
    demo = _command(sub, flags, "demo", "servers and a client in one process, no file needed",
                    "Three servers and a multi-server client on loopback: routing, "
                    "turn-based grains, a server stopping and coming back.",
                    "  forkcore demo --players 1000")
    demo.add_argument("--players", type=int, default=300, metavar="N",
                      help="player grains in the workload (default 300)")
    return parser


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
    parser = _parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.loop = getattr(args, "loop", "asyncio")
    try:
        _check_arguments(args)
    except UsageError as exc:
        _SUBCOMMANDS.get(args.command, parser).error(str(exc))  # usage, the message, exit 2
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


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse wrong command-line arguments before anything is read or connected."""
    if args.command == "call":
        args.values, args.keywords = _call_arguments(args.args)
    elif args.command == "status":
        if args.interval <= 0:
            raise UsageError(f"--interval must be greater than 0 (got {args.interval:g})")
        if args.count is not None:
            if not args.watch:
                raise UsageError("--count needs --watch (without it, status shows one table)")
            if args.count < 1:
                raise UsageError(f"--count must be at least 1 (got {args.count})")
    elif args.command == "demo" and args.players < 1:
        raise UsageError(f"--players must be at least 1 (got {args.players})")


_KEYWORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def _call_arguments(texts: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """Positional JSON arguments, then NAME=JSON keyword arguments, as Python orders
    them. (`name=...` is never JSON, so the two cannot be confused.)"""
    values: list[Any] = []
    keywords: dict[str, Any] = {}
    for position, text in enumerate(texts, 1):
        match = _KEYWORD.fullmatch(text)
        if match is None:
            if keywords:
                raise UsageError(f"argument {position} ({text!r}) is positional but comes "
                                 "after a keyword argument: put NAME=JSON arguments last")
            values.append(_json_argument(position, text))
            continue
        name, value = match.groups()
        if name in keywords:
            raise UsageError(f"keyword argument {name!r} is given twice")
        keywords[name] = _json_argument(position, value)
    return values, keywords


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _json_argument(position: int, text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:
        raise UsageError(f"argument {position} ({text!r}) is not JSON; quote strings as "
                         "'\"text\"'") from None


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
    raise ForkcoreError(f"the result cannot be shown as JSON: it holds a value of type "
                        f"{type(value).__qualname__}")


def _cmd_call(args: argparse.Namespace) -> int:
    from .client.client import Client

    client = Client.from_config(args.config)

    async def call_once() -> Any:
        async with client:
            return await client.call(args.interface, parse_key(args.key), args.method,
                                     *args.values, **args.keywords)

    result = run(args, call_once)
    print(result_json(result))
    return 0


def result_json(result: Any) -> str:
    """The result as one line of valid JSON, or `ForkcoreError` saying why it cannot be."""
    try:
        return json.dumps(result, default=_json_default, allow_nan=False)
    except ValueError as exc:  # inf or nan: JSON has no such numbers
        raise ForkcoreError(f"the result cannot be shown as JSON ({exc}: it holds inf or "
                            "nan); call the method from Python to see it") from None


# -- status -----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    from .client.client import Client

    Client.from_config(args.config)  # a configuration error is reported before anything
    run(args, _status, args)
    return 0


async def _status(args: argparse.Namespace) -> None:
    """One table, or (`--watch`) one every interval until Ctrl-C or `--count`. While no
    server answers, `--watch` shows them unreachable and tries again each refresh."""
    from .client.client import Client

    live = args.watch and sys.stdout.isatty()
    frames = 0

    def show(text: str) -> None:
        nonlocal frames
        frames += 1
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(("\x1b[H\x1b[2J" if live else "") + f"forkcore status at {stamp}\n\n{text}",
              flush=True)

    def done() -> bool:
        limit = args.count if args.watch else 1
        return limit is not None and frames >= limit

    if sys.stderr.isatty():
        print(f"connecting to {len(Client.from_config(args.config).options.servers)} "
              "server(s)...", file=sys.stderr)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, \
            anyio.CancelScope() as scope:
        async def stop_on_signal() -> None:
            async for _ in signals:
                scope.cancel()

        failed: ConnectError | None = None
        async with anyio.create_task_group() as signal_tg:
            signal_tg.start_soon(stop_on_signal)
            while not done():
                client = Client.from_config(args.config)
                try:
                    async with client:
                        await _watch(client, args, show, done)
                except ConnectError as exc:
                    if not args.watch:
                        failed = exc
                        break
                    show(unreachable_table(client, args.interval))
                if not done():
                    if not live:
                        print(flush=True)
                    await anyio.sleep(args.interval)
            signal_tg.cancel_scope.cancel()
    if failed is not None:
        raise failed


async def _watch(client: Any, args: argparse.Namespace, show: Callable[[str], None],
                 done: Callable[[], bool]) -> None:
    """Refresh the table of a connected client until `done()`."""
    previous: dict[str, dict[str, Any]] = {}
    last = clock()
    await anyio.sleep(min(0.2, client.options.health.heartbeat_interval))
    while True:
        stats = await client.server_stats()
        now = clock()
        show(status_table(client, stats, previous, now - last))
        previous, last = stats, now
        if done():
            return
        if not (args.watch and sys.stdout.isatty()):
            print(flush=True)
        await anyio.sleep(args.interval)


def unreachable_table(client: Any, interval: float) -> str:
    """Every endpoint, unreachable, with why: what `--watch` shows while none answers."""
    errors = client.unreachable
    views = [ServerView(id="?", endpoint=e, state="unreachable",
                        last_error=errors.get(e, "cannot connect"))
             for e in client.options.servers]
    return (f"{render_servers(views)}\n\nno server answers; trying again every "
            f"{interval:g}s")


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
        "IN FLIGHT": {sid: str(v.get("in_flight", "-")) for sid, v in stats.items()},
        "CALLS": {sid: str(v.get("calls", "-")) for sid, v in stats.items()},
        "CALLS/S": rates,
        "GRAINS": {sid: str(v.get("activations", "-")) for sid, v in stats.items()},
        "ROUTED": routing_shares(client.route, interfaces),
    })
    return (f"{table}\n\nmode {client.mode}; IN FLIGHT, CALLS and GRAINS: calls running, "
            "calls served and grains active on each server (all clients); ROUTED: where "
            "1,000 sample keys of each interface go now")


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

    logger = logging.getLogger("forkcore")
    level = logger.level
    if not args.debug:  # the demo narrates what the logs would say (--debug shows them)
        logger.setLevel(logging.ERROR)
    try:
        run(args, run_demo, args.players)
    finally:
        logger.setLevel(level)
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
