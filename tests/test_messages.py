"""Messages declared once: every derived form agrees (encode, decode, validation, the
fast paths and the table in docs/protocol.md); and admission, sans I/O."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkcore.errors import ProtocolError
from forkcore.grains import InterfaceInfo
from forkcore.protocol import codec
from forkcore.protocol import messages as m
from forkcore.protocol.connection import ProtocolConnection
from forkcore.security import ANONYMOUS, Identity, Role
from forkcore.server.dispatch import Refusal, admit
from forkcore.server.hosting import Targets

ROOT = Path(__file__).resolve().parent.parent

SAMPLES: list[Any] = [
    m.Hello(m.PROTOCOL_VERSION, "c", ("x",), {"token": "t"}),
    m.Welcome(m.PROTOCOL_VERSION, "s1", "eu", {"a": 1},
              (InterfaceInfo("t.c", 2, frozenset({"add", "get"})),), ("streams",)),
    m.Request(1, "t.c", "k", "add", [1, "two"], {"x": 3}, 2.5),
    m.Request(2, "t.c", 7, "add", [], {}, None, {"ctx": {"tenant": "eu"}}),
    m.Response(1, {"ok": [1, 2]}),
    m.Failure(1, m.FailureKind.REMOTE, "ValueError", "bad"),
    m.OneWay("t.c", b"k", "say", ["hi"], {}),
    m.OneWay("t.c", "k", "say", [], {}, {"ctx": {"a": 1}}),
    m.Ping(1, 0.25), m.Pong(1, 0.25), m.Goodbye("draining"), m.Cancel(9),
    m.AuthChallenge(b"n" * 32, b"p" * 32, False), m.AuthProof(b"p" * 32),
    m.StatsRequest(5), m.Stats(5, {"calls": 10}),
    m.StreamItem(3, "line"), m.StreamCredit(3, 16), m.StreamEnd(3),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips(msg: Any) -> None:
    assert m.from_wire(codec.decode(codec.encode(m.to_wire(msg)))) == msg


def test_empty_trailing_fields_stay_off_the_wire() -> None:
    assert len(m.to_wire(m.Request(1, "i", "k", "m", [], {}, None))) == 8
    assert len(m.to_wire(m.Request(1, "i", "k", "m", [], {}, None, {"ctx": {}}))) == 9
    assert len(m.to_wire(m.OneWay("i", "k", "m", [], {}))) == 6
    # defaults that are not trailing are always sent (earlier peers expect them)
    assert len(m.to_wire(m.Hello(1, "c"))) == 5
    assert len(m.to_wire(m.AuthChallenge(b"n", b"p"))) == 4


def test_wrong_field_counts_name_what_was_expected() -> None:
    with pytest.raises(ProtocolError, match="has 7 fields, expected 8 to 9"):
        m.from_wire([m.REQUEST, 1, "i", "k", "m", [], {}])
    with pytest.raises(ProtocolError, match="has 3 fields, expected 2"):
        m.from_wire([m.CANCEL, 1, 2])


def test_headers_are_checked() -> None:
    with pytest.raises(ProtocolError, match="headers must be a map"):
        m.from_wire([m.REQUEST, 1, "i", "k", "m", [], {}, None, [1]])
    with pytest.raises(ProtocolError, match="header 'ctx'"):
        m.from_wire([m.REQUEST, 1, "i", "k", "m", [], {}, None,
                     {"ctx": {str(n): n for n in range(65)}}])
    # an unknown header is a newer peer's: ignored, not refused
    assert m.from_wire([m.REQUEST, 1, "i", "k", "m", [], {}, None, {"new": 1}]).headers == \
        {"new": 1}


def test_unknown_failure_kinds_stay_strings() -> None:
    failure = m.from_wire([m.FAILURE, 1, "from-the-future", "X", "y"])
    assert isinstance(failure, m.Failure) and failure.kind == "from-the-future"


def test_the_docs_table_lists_every_message_with_its_code_and_size() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    for name, (code, fewest, most) in m.describe_layouts().items():
        sizes = str(fewest) if fewest == most else f"{fewest}\u2013{most}"
        row = re.search(rf"^\| {code} \| {name} \| [^|]+ \| {sizes} \|", text, re.M)
        assert row, f"docs/protocol.md section 4 lacks the row of {name} ({code}, {sizes})"


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=8) | st.uuids(),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
keys = st.text(max_size=8) | st.integers() | st.binary(max_size=8) | st.uuids()


@given(rid=st.integers(0, 2**63 - 1), key=keys, args=st.lists(values, max_size=3),
       kwargs=st.dictionaries(st.text(max_size=4), values, max_size=3),
       time_left=st.none() | st.floats(0, 1e6),
       context=st.none() | st.dictionaries(st.text(max_size=4), values, max_size=3))
def test_the_fast_request_paths_agree_with_the_general_ones(
        rid: int, key: Any, args: list[Any], kwargs: dict[str, Any],
        time_left: float | None, context: dict[str, Any] | None) -> None:
    headers = {"ctx": context} if context else None
    proto = ProtocolConnection("client")
    fast = proto.encode_request(rid, "t.c", key, "add", args, kwargs, time_left, headers)  # type: ignore[arg-type]
    general = codec.encode(m.to_wire(m.Request(rid, "t.c", key, "add", args, kwargs,
                                               time_left, headers)))
    assert fast == general
    item = codec.decode(fast)
    assert m.request_fields(item) == tuple(m.fields_of(m.from_wire(item)))


@given(st.lists(values, min_size=1, max_size=9))
def test_the_fast_request_check_refuses_what_the_general_one_refuses(item: list[Any]) -> None:
    item = [m.REQUEST, *item]
    try:
        general: Any = m.from_wire(item)
    except ProtocolError:
        general = ProtocolError
    try:
        fast: Any = m.request_fields(item)
    except ProtocolError:
        fast = ProtocolError
    if general is ProtocolError:
        assert fast is ProtocolError
    else:
        assert fast == tuple(m.fields_of(general))


# -- admission ---------------------------------------------------------------------------


def _targets() -> Targets:
    import forkcore

    class ICounter(forkcore.GrainInterface, name="adm.counter"):
        async def add(self, n: int) -> int: ...
        @forkcore.requires_role("admin")
        async def reset(self) -> None: ...

    class Counter(forkcore.Grain, ICounter):
        async def add(self, n: int) -> int:
            return n

        async def reset(self) -> None:
            pass

    from forkcore.server.hosting import find_grain_classes, host_table

    return Targets("s1", host_table(find_grain_classes([Counter])))


TARGETS = _targets()
USER = Identity("u", Role.USER, "token")


@pytest.mark.parametrize(("interface", "method", "identity", "draining", "busy", "expected"), [
    ("adm.counter", "add", ANONYMOUS, False, 0, False),
    ("adm.counter", "nope", ANONYMOUS, False, 0, "MethodNotFound"),
    ("adm.other", "add", ANONYMOUS, True, 99, "MethodNotFound"),
    ("adm.counter", "reset", USER, False, 0, "Unauthorized"),
    ("adm.counter", "reset", USER, True, 0, "Unauthorized"),
    ("adm.counter", "add", USER, True, 0, "ServerDraining"),
    ("adm.counter", "add", USER, False, 8, "TooManyCalls"),
    ("adm.counter", "add", USER, False, 7, False),
])
def test_admission(interface: str, method: str, identity: Identity, draining: bool,
                   busy: int, expected: Any) -> None:
    verdict = admit(TARGETS, interface, method, identity, draining=draining, busy=busy,
                    max_in_flight=8)
    if isinstance(expected, str):
        assert isinstance(verdict, Refusal) and verdict.type_name == expected
    else:
        assert verdict is expected


def test_admission_explains_what_is_hosted() -> None:
    verdict = admit(TARGETS, "adm.other", "add", ANONYMOUS, draining=False, busy=0,
                    max_in_flight=8)
    assert isinstance(verdict, Refusal)
    assert "hosts no interface 'adm.other' (it hosts: adm.counter)" in verdict.message


def test_a_failed_frame_does_not_spoil_the_next_ones() -> None:
    """The strict decoder is reused between frames (and dropped after one that raised):
    frames after a broken one (too deep, truncated, a refused tag, trailing bytes) still
    decode, on the strict path and the guarded one, and threads do not share one."""
    import threading

    import cbor2

    deep: Any = 1
    for _ in range(60):
        deep = [deep]
    too_deep: Any = deep
    for _ in range(10):
        too_deep = [too_deep]
    for bad in (cbor2.dumps(too_deep), cbor2.dumps([1, 2])[:-1],
                cbor2.dumps(cbor2.CBORTag(28, [1])), cbor2.dumps({1: "a"}) + b"\x00"):
        with pytest.raises(ProtocolError):
            codec.decode(bad)
        assert codec.decode(cbor2.dumps(deep)) == deep
        assert codec.decode(cbor2.dumps({(1, 2): "k"})) == {(1, 2): "k"}  # the guarded path
    results: list[Any] = []

    def decode_many() -> None:
        results.extend(codec.decode(cbor2.dumps([n, "x" * n])) for n in range(500))

    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 2000 and all(r[1] == "x" * r[0] for r in results)
