"""Configuration: TOML (or a mapping, or keyword arguments) → validated attrs options.

Every option is declared once, with its type, default, check and a one-line doc, so the
file reader, the Python constructors and the documentation agree. An unknown key, a
wrong type or a bad value is a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from .errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def option(
    default: Any = _MISSING,
    *,
    types: tuple[type, ...],
    doc: str,
    check: Callable[[Any], str | None] | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare an option: allowed `types`, an optional `check` returning a complaint."""
    meta = {"types": types, "doc": doc, "check": check}
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta, kw_only=True)
    if default is _MISSING:
        return attrs.field(metadata=meta, kw_only=True)
    return attrs.field(default=default, metadata=meta, kw_only=True)


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must not be negative"


def share(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def at_least_one(v: Any) -> str | None:
    return None if v >= 1 else "must be at least 1"


def non_empty(v: Any) -> str | None:
    return None if v else "must not be empty"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def endpoint_list(v: Any) -> str | None:
    if not v:
        return "must list at least one 'host:port'"
    if not all(isinstance(e, str) for e in v):
        return "must be a list of 'host:port' strings"
    from .transport import split_endpoint

    for e in v:
        try:
            split_endpoint(e)
        except ConfigError as exc:
            return str(exc)
    return None


def endpoint(v: Any) -> str | None:
    return endpoint_list([v])


def role_name(v: Any) -> str | None:
    roles = ("anonymous", "guest", "user", "server", "admin")
    return None if v in roles else f"must be one of {', '.join(roles)}"


def str_list(v: Any) -> str | None:
    return None if all(isinstance(e, str) for e in v) else "must be a list of strings"


NUMBER = (int, float)


@attrs.frozen
class HealthOptions:
    heartbeat_interval: float = option(1.0, types=NUMBER, check=positive,
                                       doc="seconds between heartbeats to each server")
    unhealthy_after: int = option(3, types=(int,), check=at_least_one,
                                  doc="missed heartbeats after which a server is unhealthy")
    eject_after: int = option(5, types=(int,), check=at_least_one,
                              doc="consecutive failed calls after which a server is ejected")
    ejection_time: float = option(1.0, types=NUMBER, check=positive,
                                  doc="seconds of the first ejection; each next one is longer")
    max_ejection_time: float = option(30.0, types=NUMBER, check=positive,
                                      doc="cap of an ejection in seconds")
    max_ejected_share: float = option(0.5, types=NUMBER, check=share,
                                      doc="largest share of servers ejected at once (0..1)")
    retry_budget: float = option(50.0, types=NUMBER, check=non_negative,
                                 doc="retry tokens (the bucket's size); a resend takes one, "
                                     "a successful call returns 0.2")


@attrs.frozen
class SecurityOptions:
    """`[client.security]`: how the client proves who it is."""

    psk: str | None = option(None, types=(str,), doc="pre-shared key (at least 16 bytes)")
    psk_file: str | None = option(None, types=(str,), doc="file holding the pre-shared key")
    identity: str = option("client", types=(str,), check=non_empty,
                           doc="name this client gives with the pre-shared key")
    token: str | None = option(None, types=(str,),
                               doc="token for the server's authenticator plugin")


@attrs.frozen
class ServerSecurityOptions:
    """`[server.security]`: who may connect, and with which role."""

    psk: str | None = option(None, types=(str,),
                             doc="pre-shared key every client must prove (at least 16 bytes)")
    psk_file: str | None = option(None, types=(str,), doc="file holding the pre-shared key")
    psk_role: str = option("user", types=(str,), check=role_name,
                           doc="role of clients that proved the pre-shared key")
    allow_anonymous: bool = option(True, types=(bool,),
                                   doc="accept clients that do not authenticate (role "
                                       "anonymous); false: refuse them")
    authenticator: str | None = option(None, types=(str,),
                                       doc="authenticator plugin that validates client tokens")
    authenticator_options: dict[str, Any] = option(
        factory=dict, types=(dict,), doc="keyword options for the authenticator factory")


@attrs.frozen
class ClientOptions:
    servers: list[str] = option(types=(list,), check=endpoint_list,
                                doc="server endpoints, 'host:port'")
    mode: str = option("single", types=(str,), check=one_of("single", "multi"),
                       doc="'single': one server at a time; 'multi': all servers at once")
    transport: str = option("tcp", types=(str,), check=non_empty, doc="transport plugin name")
    strategy: str = option("round_robin", types=(str,), check=non_empty,
                           doc="strategy plugin name (multi mode)")
    strategy_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                              doc="keyword options for the strategy factory")
    conflict_resolver: str = option("highest_version", types=(str,), check=non_empty,
                                    doc="conflict resolver plugin name")
    affinity: str = option("none", types=(str,), check=non_empty,
                           doc="affinity policy plugin name")
    affinity_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                              doc="keyword options for the affinity policy")
    observers: list[Any] = option(factory=list, types=(list, tuple),
                                  doc="observer plugin names (or, from Python, objects)")
    observer_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                              doc="observer name -> its keyword options")
    interceptors: list[Any] = option(factory=list, types=(list, tuple),
                                     doc="interceptor plugin names (or, from Python, "
                                         "objects), run in order around every outgoing call")
    interceptor_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                                 doc="interceptor name -> its keyword options")
    connections_per_server: int = option(1, types=(int,), check=at_least_one,
                                         doc="connections to each server (multi mode)")
    request_timeout: float = option(10.0, types=NUMBER, check=positive,
                                    doc="seconds a call may take unless its method says otherwise")
    connect_timeout: float = option(5.0, types=NUMBER, check=positive,
                                    doc="seconds to establish one connection, handshake included")
    transport_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                               doc="keyword options for the transport factory")
    reconnect_initial_delay: float = option(0.05, types=NUMBER, check=positive,
                                            doc="first reconnect delay in seconds (doubles)")
    reconnect_max_delay: float = option(5.0, types=NUMBER, check=positive,
                                        doc="cap of the reconnect delay in seconds")
    client_id: str | None = option(None, types=(str,),
                                   doc="id sent in the handshake (default: random)")
    health: HealthOptions = option(factory=HealthOptions, types=(HealthOptions,),
                                   doc="[client.health] table")
    security: SecurityOptions = option(factory=SecurityOptions, types=(SecurityOptions,),
                                       doc="[client.security] table")


@attrs.frozen
class ServerOptions:
    id: str = option(types=(str,), check=non_empty, doc="the server's id, announced to clients")
    listen: str = option("127.0.0.1:0", types=(str,), check=endpoint,
                         doc="'host:port' to listen on (port 0: any free port)")
    transport: str = option("tcp", types=(str,), check=non_empty, doc="transport plugin name")
    grains: list[Any] = option(factory=list, types=(list, tuple),
                               doc="modules to import; the Grain classes they define are hosted")
    zone: str | None = option(None, types=(str,), doc="the server's zone, for zone affinity")
    metadata: dict[str, Any] = option(factory=dict, types=(dict,),
                                      doc="free-form metadata announced to clients")
    transport_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                               doc="keyword options for the transport factory")
    idle_timeout: float = option(900.0, types=NUMBER, check=positive,
                                 doc="seconds after its last call an activation is deactivated")
    collection_interval: float = option(10.0, types=NUMBER, check=positive,
                                        doc="seconds between sweeps for idle activations")
    drain_timeout: float = option(10.0, types=NUMBER, check=positive,
                                  doc="seconds calls in flight may take to finish at shutdown")
    handshake_timeout: float = option(5.0, types=NUMBER, check=positive,
                                      doc="seconds a new connection has to complete its handshake")
    max_in_flight: int = option(1024, types=(int,), check=at_least_one,
                                doc="calls queued or running per connection, requests and "
                                    "one-way calls together; an excess request is refused "
                                    "(TooManyCalls), an excess one-way call dropped")
    max_depth: int = option(64, types=(int,), check=at_least_one,
                            doc="maximum nesting depth of a received value")
    security: ServerSecurityOptions = option(factory=ServerSecurityOptions,
                                             types=(ServerSecurityOptions,),
                                             doc="[server.security] table")
    max_connections: int = option(10_000, types=(int,), check=at_least_one,
                                  doc="client connections open at once; more are closed")
    max_connections_per_address: int = option(
        1_000, types=(int,), check=at_least_one,
        doc="client connections open at once from one source address")
    max_activations: int = option(1_000_000, types=(int,), check=at_least_one,
                                  doc="activations at once; the least recently used idle "
                                      "ones are deactivated to make room")
    debug: bool = option(False, types=(bool,),
                         doc="failures carry the grain's traceback to the caller "
                             "(RemoteError.traceback); off by default: tracebacks can show "
                             "the server's internals")
    interceptors: list[Any] = option(factory=list, types=(list, tuple),
                                     doc="interceptor plugin names (or, from Python, "
                                         "objects), run in order around every served call")
    interceptor_options: dict[str, Any] = option(factory=dict, types=(dict,),
                                                 doc="interceptor name -> its keyword options")


_NESTED: dict[tuple[type, str], type] = {
    (ClientOptions, "health"): HealthOptions,
    (ClientOptions, "security"): SecurityOptions,
    (ServerOptions, "security"): ServerSecurityOptions,
}


def build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build option class `cls` from `data`, checking every key; `where` prefixes errors
    (e.g. "server.toml: [client]")."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table of options, got {type(data).__name__}")
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint = did_you_mean(unknown[0], fields)
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{hint}; known keys: "
                          f"{', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        field = fields[name]
        nested = _NESTED.get((cls, name))
        if nested is not None and not isinstance(value, nested):
            if value is None:
                continue
            value = build(nested, value, f"{where}.{name}")
        values[name] = _checked(value, field, f"{where} key {name!r}")
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in values]
    if missing:
        raise ConfigError(f"{where}: key {missing[0]!r} is required")
    return cls(**values)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" (did you mean 'request_timeout'?)" for the closest known name, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checked(value: Any, field: Any, where: str) -> Any:
    types: tuple[type, ...] = field.metadata["types"]
    if value is None and field.default is None:
        return None
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("number" if t is float else t.__name__ for t in types if t is not int
                            or float not in types)
        raise ConfigError(f"{where} must be {names}, not {type(value).__name__} ({value!r})")
    if float in types and isinstance(value, int):
        value = float(value)
    if isinstance(value, tuple):
        value = list(value)
    check = field.metadata["check"]
    if check is not None:
        complaint = check(value)
        if complaint:
            raise ConfigError(f"{where} {complaint} (got {value!r})")
    return value


@attrs.frozen
class Config:
    """A loaded configuration file: its `[client]` and `[server]` tables, either may be None."""

    client: ClientOptions | None
    server: ServerOptions | None
    path: str | None = None


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


PATH_SUFFIXES = ("_file", "_path", "_dir")


def resolve_paths(data: Any, base_dir: str | Path) -> Any:
    """`data` with every string under a key ending in `_file`, `_path` or `_dir` (at any
    depth: `psk_file`, `transport_options.ca_file`, a plugin's own) made absolute against
    `base_dir`, so a file works from whatever directory it is used in."""
    if isinstance(data, Mapping):
        return {k: (_resolved(v, base_dir) if isinstance(k, str) and k.endswith(PATH_SUFFIXES)
                    else resolve_paths(v, base_dir)) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_paths(v, base_dir) for v in data]
    return data


def _resolved(value: Any, base_dir: str | Path) -> Any:
    if isinstance(value, str) and value:
        return os.path.join(base_dir, os.path.expanduser(value))  # absolute paths stay
    if isinstance(value, list):
        return [_resolved(v, base_dir) for v in value]
    return value


def load_config(path: str | Path | Mapping[str, Any],
                base_dir: str | Path | None = None) -> Config:
    """Read a TOML file (or an already parsed mapping) into validated options.

    Relative paths in options ending in `_file`, `_path` or `_dir` resolve against the
    file's directory (for a mapping: against `base_dir` if given, else they stay as they
    are, relative to the working directory)."""
    if isinstance(path, Mapping):
        data, label = dict(path), "<config>"
    else:
        data, label = read_toml(path), str(path)
        base_dir = Path(path).resolve().parent if base_dir is None else base_dir
    if base_dir is not None:
        data = resolve_paths(data, base_dir)
    unknown = sorted(set(data) - {"client", "server"})
    if unknown:
        raise ConfigError(f"{label}: unknown table [{unknown[0]}]"
                          f"{did_you_mean(unknown[0], ('client', 'server'))}; use [client] "
                          "and [server]")
    client = build(ClientOptions, data["client"], f"{label}: [client]") if "client" in data \
        else None
    server = build(ServerOptions, data["server"], f"{label}: [server]") if "server" in data \
        else None
    return Config(client, server, None if label == "<config>" else label)


def options_from_kwargs(cls: type[T], kwargs: Mapping[str, Any], label: str) -> T:
    """Build options from Python keyword arguments with the same checks as the file."""
    return build(cls, {k: v for k, v in kwargs.items() if v is not None}, label)
