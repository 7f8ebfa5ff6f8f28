"""Client and server interceptors end to end, enabled by name from configuration: order,
options, changing the call's context and arguments, answering without the call, raising;
on the server: the caller's identity and context, refusals and the error mapping of the
contract (a `forkcore.errors` type reaches the caller as that type and is not retried; any
other exception as RemoteError)."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import forkcore
from forkcore import errors
from forkcore.interfaces import Interceptor, RegisterInterceptor
from forkcore.plugins import get_plugin_manager, registry

pytestmark = pytest.mark.anyio

WAIT = 10.0
PSK = "interceptor-tests-shared-key-0123456789"

JOURNAL: list[tuple[Any, ...]] = []  # what the interceptors and grains saw, in order


class IAudited(forkcore.GrainInterface, name="icpt.audited"):
    async def add(self, a: int, b: int = 0) -> int: ...
    async def context(self) -> dict[str, Any]: ...
    @forkcore.rpc(idempotent=True)
    async def safe(self) -> str: ...
    async def grain_raises(self, name: str) -> None: ...


class Audited(forkcore.Grain, IAudited):
    async def add(self, a: int, b: int = 0) -> int:
        JOURNAL.append(("grain", "add", a, b))
        return a + b

    async def context(self) -> dict[str, Any]:
        JOURNAL.append(("grain", "context"))
        return dict(forkcore.current_context())

    async def safe(self) -> str:
        JOURNAL.append(("grain", "safe"))
        return "ran"

    async def grain_raises(self, name: str) -> None:
        raise getattr(errors, name, ValueError)(f"{name} from the grain")


# -- the interceptors, registered as a plugin -------------------------------------------


class Tag:
    """Notes itself before and after, and appends its label to context entry `path`."""

    def __init__(self, label: str) -> None:
        self.label = label

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        JOURNAL.append((self.label, "before", call.side, call.method))
        call.context["path"] = call.context.get("path", "") + self.label
        result = await proceed()
        JOURNAL.append((self.label, "after", call.side, call.method))
        return result


class Scale:
    """Multiplies integer arguments (positional and keyword) by `factor`."""

    def __init__(self, factor: int = 2) -> None:
        self.factor = factor

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        call.args = [a * self.factor if isinstance(a, int) else a for a in call.args]
        call.kwargs.update({k: v * self.factor for k, v in call.kwargs.items()
                            if isinstance(v, int)})
        return await proceed()


class Answer:
    """Answers calls to `method` with `value`, without the call."""

    def __init__(self, method: str, value: Any) -> None:
        self.method = method
        self.value = value

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        if call.method == self.method:
            return self.value
        return await proceed()


class Raise:
    """Raises `error` (a forkcore.errors name, or a builtin exception's) on `method`."""

    def __init__(self, error: str, method: str = "*") -> None:
        self.error = error
        self.method = method

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        if self.method in ("*", call.method):
            JOURNAL.append(("raise", self.error, call.method))
            cls = getattr(errors, self.error, None) or getattr(builtins, self.error)
            raise cls(f"{self.error} from an interceptor")
        return await proceed()


class Spy:
    """Records everything a call shows an interceptor."""

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        JOURNAL.append(("spy", call.side, call.grain_id, call.method, list(call.args),
                        dict(call.kwargs), dict(call.context), call.caller))
        return await proceed()


class Guard:
    """Refuses calls whose context lacks `token`."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        if call.context.get("token") != self.token:
            raise errors.Unauthorized(f"{call.method}: no valid token in the call context; "
                                      "call inside forkcore.call_context(token=...)")
        return await proceed()


class Rewrite:
    """Sets the call's context to `entries` (an empty table: no context at all)."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries = entries

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        call.context = dict(self.entries)
        return await proceed()


class Flood:
    """Puts `count` entries, or one of `size` bytes, or an object into the context."""

    def __init__(self, count: int = 0, size: int = 0, unsendable: bool = False) -> None:
        self.count, self.size, self.unsendable = count, size, unsendable

    async def intercept(self, call: forkcore.CallInfo, proceed: Any) -> Any:
        call.context.update({f"k{i}": i for i in range(self.count)})
        if self.size:
            call.context["blob"] = b"x" * self.size
        if self.unsendable:
            call.context["handle"] = object()
        return await proceed()


FACTORIES: dict[str, Any] = {"t_tag": Tag, "t_tag2": Tag, "t_scale": Scale,
                             "t_answer": Answer, "t_raise": Raise, "t_spy": Spy,
                             "t_guard": Guard, "t_rewrite": Rewrite, "t_flood": Flood}


class InterceptorPlugin:
    @forkcore.hookimpl
    def forkcore_register_interceptors(self, register: RegisterInterceptor) -> None:
        for name, factory in FACTORIES.items():
            register(name, factory)


@pytest.fixture(autouse=True)
def plugin() -> Iterator[None]:
    pm = get_plugin_manager()
    registered = InterceptorPlugin()
    pm.register(registered, name="test-interceptors")
    JOURNAL.clear()
    yield
    pm.unregister(registered)
    JOURNAL.clear()


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client_config(tmp_path: Path, endpoint: str, transport: str, names: list[str],
                  options: str = "") -> Path:
    path = tmp_path / "client.toml"
    path.write_text(f'[client]\nservers = ["{endpoint}"]\ntransport = "{transport}"\n'
                    f"request_timeout = 5.0\ninterceptors = {names!r}\n{options}",
                    encoding="utf-8")
    return path


@pytest.fixture
async def plain_server(transport: str) -> AsyncIterator[forkcore.Server]:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited]) as server:
        yield server


def grain_calls() -> list[tuple[Any, ...]]:
    return [e for e in JOURNAL if e[0] == "grain"]


# -- the plugin kind --------------------------------------------------------------------


def test_interceptor_objects_satisfy_the_protocol() -> None:
    assert set(FACTORIES) <= set(registry("interceptor"))
    for factory in (Tag("x"), Scale(), Answer("m", 1), Raise("ValueError"), Spy(),
                    Guard("t"), Rewrite({}), Flood()):
        assert isinstance(factory, Interceptor)


def test_unknown_interceptor_name_names_the_installed_ones(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match=r"interceptor 'audit' is not installed "
                       r"\(interceptors installed: .*t_guard.*t_spy"):
        forkcore.Client(servers=["127.0.0.1:1"], interceptors=["t_spy", "audit"])
    with pytest.raises(errors.ConfigError, match=r"interceptors installed: .*t_tag"):
        forkcore.Server(id="s", grains=[Audited], interceptors=["audit"])
    path = client_config(tmp_path, "127.0.0.1:1", "tcp", ["audit"])
    with pytest.raises(errors.ConfigError) as caught:
        forkcore.Client.from_config(path)
    assert str(path) in str(caught.value) and "'interceptors'" in str(caught.value)


def test_bad_interceptor_options_are_a_config_error(tmp_path: Path) -> None:
    path = client_config(tmp_path, "127.0.0.1:1", "tcp", ["t_tag"],
                         "[client.interceptor_options.t_tag]\nlabel = 'A'\ncolour = 'red'\n")
    with pytest.raises(errors.ConfigError, match=r"interceptor_options.*rejected its options"):
        forkcore.Client.from_config(path)
    with pytest.raises(errors.ConfigError, match="must be a table"):
        forkcore.Client(servers=["127.0.0.1:1"], interceptors=["t_scale"],
                        interceptor_options={"t_scale": 3})
    with pytest.raises(errors.ConfigError, match="neither an interceptor name nor"):
        forkcore.Client(servers=["127.0.0.1:1"], interceptors=[42])


def test_forkcore_plugins_lists_interceptors() -> None:
    code = ("import forkcore, sys\n"
            "from forkcore.cli import main\n"
            "from forkcore.plugins import get_plugin_manager\n"
            "class P:\n"
            "    @forkcore.hookimpl\n"
            "    def forkcore_register_interceptors(self, register):\n"
            "        register('audit_log', object)\n"
            "get_plugin_manager().register(P(), name='audit-dist')\n"
            "sys.exit(main(['plugins']))\n")
    env = {k: v for k, v in os.environ.items() if k != "FORKCORE_DISABLE_PLUGIN_AUTOLOAD"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["interceptor", "audit_log", "audit-dist"] in rows, result.stdout


# -- client interceptors ----------------------------------------------------------------


async def test_client_interceptors_run_in_order_with_their_options(
        plain_server: forkcore.Server, transport: str, tmp_path: Path) -> None:
    assert plain_server.endpoint
    path = client_config(tmp_path, plain_server.endpoint, transport, ["t_tag", "t_tag2"],
                         "[client.interceptor_options.t_tag]\nlabel = 'A'\n"
                         "[client.interceptor_options.t_tag2]\nlabel = 'B'\n")
    async with forkcore.Client.from_config(path) as client:
        audited = client.get_grain(IAudited, "k")
        with anyio.fail_after(WAIT):
            assert await audited.context() == {"path": "AB"}
            with forkcore.call_context(path="X", user="ann"):
                assert await client.call("icpt.audited", "k", "context") == {
                    "path": "XAB", "user": "ann"}
                # the caller's own context is not changed by what interceptors did
                assert dict(forkcore.current_context()) == {"path": "X", "user": "ann"}
    assert [e for e in JOURNAL if e[0] != "grain"] == [
        ("A", "before", "client", "context"), ("B", "before", "client", "context"),
        ("B", "after", "client", "context"), ("A", "after", "client", "context")] * 2


async def test_client_interceptor_changes_args_and_context(
        plain_server: forkcore.Server, transport: str) -> None:
    assert plain_server.endpoint
    async with forkcore.Client(servers=[plain_server.endpoint], transport=transport,
                               interceptors=["t_scale", "t_spy"],
                               interceptor_options={"t_scale": {"factor": 10}}) as client:
        with anyio.fail_after(WAIT):
            assert await client.get_grain(IAudited, 7).add(2, b=3) == 50
    spy = [e for e in JOURNAL if e[0] == "spy"]
    assert spy == [("spy", "client", forkcore.GrainId("icpt.audited", 7), "add", [20],
                    {"b": 30}, {}, None)]
    assert grain_calls() == [("grain", "add", 20, 30)]


async def test_client_interceptor_may_drop_or_replace_the_context(
        plain_server: forkcore.Server, transport: str) -> None:
    assert plain_server.endpoint
    for entries, expected in (({}, {}), ({"only": 1}, {"only": 1})):
        async with forkcore.Client(servers=[plain_server.endpoint], transport=transport,
                                   interceptors=["t_rewrite"],
                                   interceptor_options={"t_rewrite": {"entries": entries}}
                                   ) as client:
            with anyio.fail_after(WAIT), forkcore.call_context(secret="s"):
                assert await client.get_grain(IAudited, "r").context() == expected


async def test_client_interceptor_answers_without_the_call(
        plain_server: forkcore.Server, transport: str) -> None:
    assert plain_server.endpoint
    async with forkcore.Client(servers=[plain_server.endpoint], transport=transport,
                               interceptors=["t_answer"],
                               interceptor_options={"t_answer": {"method": "add",
                                                                 "value": -1}}) as client:
        with anyio.fail_after(WAIT):
            assert await client.get_grain(IAudited, "a").add(1, 2) == -1
            assert await client.get_grain(IAudited, "a").context() == {}
    assert grain_calls() == [("grain", "context")]


@pytest.mark.parametrize("error, expected", [("ValueError", ValueError),
                                             ("Unauthorized", errors.Unauthorized),
                                             ("ConnectError", errors.ConnectError)])
async def test_client_interceptor_raises_to_the_caller_and_nothing_is_sent(
        plain_server: forkcore.Server, transport: str, error: str,
        expected: type[Exception]) -> None:
    assert plain_server.endpoint
    async with forkcore.Client(servers=[plain_server.endpoint], transport=transport,
                               interceptors=["t_raise"],
                               interceptor_options={"t_raise": {"error": error,
                                                                "method": "safe"}}) as client:
        audited = client.get_grain(IAudited, "x")
        with anyio.fail_after(WAIT):
            with pytest.raises(expected, match="from an interceptor"):
                await audited.safe()
            assert await audited.add(1) == 1  # the client is fine
    assert grain_calls() == [("grain", "add", 1, 0)]
    assert [e for e in JOURNAL if e[0] == "raise"] == [("raise", error, "safe")]


@pytest.mark.parametrize("options, expected", [
    ({"count": 65}, ValueError), ({"size": 9000}, ValueError),
    ({"unsendable": True}, forkcore.WireTypeError)])
async def test_context_an_interceptor_overfills_fails_before_sending(
        plain_server: forkcore.Server, transport: str, options: dict[str, Any],
        expected: type[Exception]) -> None:
    assert plain_server.endpoint
    async with forkcore.Client(servers=[plain_server.endpoint], transport=transport,
                               interceptors=["t_flood"],
                               interceptor_options={"t_flood": options}) as client:
        with anyio.fail_after(WAIT):
            with pytest.raises(expected):
                await client.get_grain(IAudited, "f").add(1)
    assert grain_calls() == []


# -- server interceptors ----------------------------------------------------------------


async def test_server_interceptors_see_caller_context_and_run_in_order(
        transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_spy", "t_tag", "t_tag2", "t_scale"],
                               interceptor_options={"t_tag": {"label": "S"},
                                                    "t_tag2": {"label": "T"},
                                                    "t_scale": {"factor": 3}},
                               security={"psk": PSK, "psk_role": "admin"}) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   security={"psk": PSK, "identity": "alice"}) as client:
            audited = client.get_grain(IAudited, "srv")
            with anyio.fail_after(WAIT):
                with forkcore.call_context(request_id="r-1"):
                    assert await audited.add(1, b=2) == 9
                    # the context is writable on the client side only: the grain sees
                    # what the caller sent
                    assert await audited.context() == {"request_id": "r-1"}
                assert await audited.context() == {}
    spies = [e for e in JOURNAL if e[0] == "spy"]
    caller = spies[0][7]
    assert isinstance(caller, forkcore.Identity)
    assert (caller.name, caller.role, caller.method) == ("alice", forkcore.Role.ADMIN, "psk")
    assert [s[1:7] for s in spies] == [
        ("server", forkcore.GrainId("icpt.audited", "srv"), "add", [1], {"b": 2},
         {"request_id": "r-1"}),
        ("server", forkcore.GrainId("icpt.audited", "srv"), "context", [], {},
         {"request_id": "r-1"}),
        ("server", forkcore.GrainId("icpt.audited", "srv"), "context", [], {}, {})]
    assert JOURNAL[1:6] == [("S", "before", "server", "add"), ("T", "before", "server", "add"),
                            ("grain", "add", 3, 6), ("T", "after", "server", "add"),
                            ("S", "after", "server", "add")]


async def test_anonymous_caller_is_the_anonymous_identity(transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_spy"]) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport) as client:
            with anyio.fail_after(WAIT):
                await client.get_grain(IAudited, "anon").add(1)
    [spy] = [e for e in JOURNAL if e[0] == "spy"]
    assert spy[7].role is forkcore.Role.ANONYMOUS and not spy[7].authenticated


async def test_server_interceptor_refuses_with_unauthorized(transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_guard"],
                               interceptor_options={"t_guard": {"token": "t0k"}}) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport) as client:
            audited = client.get_grain(IAudited, "guarded")
            with anyio.fail_after(WAIT):
                with pytest.raises(errors.Unauthorized, match="no valid token"):
                    await audited.add(1)
                with forkcore.call_context(token="wrong"), \
                        pytest.raises(errors.Unauthorized):
                    await audited.safe()
                with forkcore.call_context(token="t0k"):
                    assert await audited.add(2) == 2
    assert grain_calls() == [("grain", "add", 2, 0)]


@pytest.mark.parametrize("error", ["ConnectError", "RequestTimeout", "MethodNotFound",
                                   "NoServerAvailable", "ConfigError", "ProtocolError"])
async def test_server_interceptor_forkcore_error_reaches_the_caller_as_its_type_once(
        transport: str, error: str) -> None:
    """`safe` is idempotent: a lost connection would be resent, an interceptor's error
    raised on the server must not be (it ran once), and the connection stays usable."""
    expected = getattr(errors, error)
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_raise"],
                               interceptor_options={"t_raise": {"error": error,
                                                                "method": "safe"}}) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   request_timeout=5.0) as client:
            audited = client.get_grain(IAudited, "e")
            with anyio.fail_after(WAIT):
                with pytest.raises(expected, match="from an interceptor") as caught:
                    await audited.safe()
                assert type(caught.value) is expected
                assert await audited.add(4) == 4
    assert [e for e in JOURNAL if e[0] == "raise"] == [("raise", error, "safe")]
    assert grain_calls() == [("grain", "add", 4, 0)]


async def test_server_interceptor_other_exception_is_remote_error(transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_raise"],
                               interceptor_options={"t_raise": {"error": "KeyError"}}
                               ) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport) as client:
            with anyio.fail_after(WAIT), pytest.raises(errors.RemoteError) as caught:
                await client.get_grain(IAudited, "v").safe()
    assert caught.value.type_name == "KeyError"
    assert grain_calls() == []


@pytest.mark.parametrize("interceptors", [[], ["t_spy"]])
async def test_a_grain_s_own_forkcore_error_is_remote_error(
        transport: str, interceptors: list[str]) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=interceptors) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport) as client:
            audited = client.get_grain(IAudited, "g")
            with anyio.fail_after(WAIT):
                for name in ("Unauthorized", "ConnectError", "ValueError"):
                    with pytest.raises(errors.RemoteError) as caught:
                        await audited.grain_raises(name)
                    assert caught.value.type_name == name


async def test_server_interceptor_answers_without_the_grain(transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_answer"],
                               interceptor_options={"t_answer": {"method": "add",
                                                                 "value": [1, "cached"]}}
                               ) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport) as client:
            with anyio.fail_after(WAIT):
                assert await client.get_grain(IAudited, "c").add(5) == [1, "cached"]
    assert grain_calls() == []


async def test_client_and_server_interceptors_together(transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Audited],
                               interceptors=["t_guard"],
                               interceptor_options={"t_guard": {"token": "abc"}}) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   interceptors=["t_rewrite"],
                                   interceptor_options={"t_rewrite": {
                                       "entries": {"token": "abc"}}}) as client:
            with anyio.fail_after(WAIT):
                assert await client.get_grain(IAudited, "both").context() == {"token": "abc"}
