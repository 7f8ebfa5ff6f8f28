#!/usr/bin/env python
"""atheris target for forkcore's sans-IO protocol layer.

    pip install atheris
    python fuzz/fuzz_protocol.py -atheris_runs=200000 -timeout=10 -rss_limit_mb=1024

Each input is fed to a `FrameDecoder` and a `ProtocolConnection`, in one of sixteen
situations (server or client side; before, during or after the handshake; with or
without a PSK session cipher), and every input must end in a clean `ProtocolError` or
in valid messages: any other exception is a crash, and so is a broken invariant
(below). libFuzzer's `-timeout` catches hangs and `-rss_limit_mb` unbounded memory.

The first input byte chooses the situation and how the rest is delivered; the input
format is this file's own (not atheris' FuzzedDataProvider), so any byte string is a
valid input, `run_one(data)` can be called without atheris (the test suite does), and a
crash file replays with `python fuzz/fuzz_protocol.py crash-<sha1>`. See fuzz/README.md.

Invariants checked on every input:

- `FrameDecoder.feed` returns frame bodies no longer than `max_frame_size` and never
  holds more than one frame's worth of data (`buffered <= 4 + max_frame_size`);
- `ProtocolConnection.decode` returns one of the protocol's message classes, or raises
  `ProtocolError`, after which the connection is closed and stays closed;
- a decoded message re-encodes (or fails with `WireTypeError`, for values only a
  receiver can hold), and what it re-encodes to decodes to the same message, encoding
  to the same bytes (what the server echoes, a client can read);
- with a session cipher, a frame opens only if it is exactly the frame the peer sealed
  at that position: tampered, replayed, reordered and dropped frames all fail.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # the target still runs (replay, smoke loop, the test suite)
    atheris = None

_instrument: Any = contextlib.nullcontext()
if atheris is not None and __name__ == "__main__" and "--make-corpus" not in sys.argv:
    _instrument = atheris.instrument_imports(include=["forkcore", "cbor2"])

with _instrument:
    from forkcore.errors import ProtocolError
    from forkcore.protocol import codec
    from forkcore.protocol.connection import ProtocolConnection, State
    from forkcore.protocol.framing import FrameDecoder, frame
    from forkcore.protocol.messages import (
        PROTOCOL_VERSION,
        AuthChallenge,
        AuthProof,
        Hello,
        Message,
        Welcome,
        from_wire,
        to_wire,
    )
    from forkcore.security import SessionCipher

MESSAGE_TYPES = typing.get_args(Message)
KEY = b"fuzzing key, at least sixteen bytes"
CLIENT_NONCE = bytes(range(32))
SERVER_NONCE = bytes(range(32, 64))
FRAME_SIZES = (64, 300, 4096, 65536)

# (role, stage): what the connection has already seen when the input arrives
SITUATIONS = (
    ("server", "fresh"),  # expects Hello
    ("server", "challenged"),  # sent AuthChallenge, expects AuthProof
    ("server", "open"),  # handshake done, plain
    ("server", "open+cipher"),  # handshake done, PSK session cipher
    ("client", "fresh"),  # sent Hello, expects Welcome or AuthChallenge
    ("client", "proved"),  # sent AuthProof, expects the sealed Welcome
    ("client", "open"),
    ("client", "open+cipher"),
)


class Reader:
    """Takes bytes, small integers and chunks from the front of the input."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def chunks(self) -> Iterator[bytes]:
        """The rest of the input as length-prefixed chunks (1-byte lengths)."""
        while self.left():
            yield self.take(self.byte() or 1)


def connection(role: str, stage: str, max_depth: int) -> tuple[ProtocolConnection,
                                                               SessionCipher | None]:
    """A connection in the given stage, and the peer's cipher if the session has one."""
    proto = ProtocolConnection(role, max_depth=max_depth)  # type: ignore[arg-type]
    peer_role = "client" if role == "server" else "server"
    cipher = peer = None
    if stage in ("proved", "open+cipher"):
        cipher = SessionCipher(KEY, CLIENT_NONCE, SERVER_NONCE, role)
        peer = SessionCipher(KEY, CLIENT_NONCE, SERVER_NONCE, peer_role)
    if role == "server":
        if stage != "fresh":
            proto.decode(codec.encode(to_wire(Hello(PROTOCOL_VERSION, "peer", (), None))))
        if stage == "challenged":
            proto.encode(AuthChallenge(SERVER_NONCE, bytes(32)))
        elif stage.startswith("open"):
            proto.encode(Welcome(PROTOCOL_VERSION, "me", None, {}, ()))
    else:
        proto.encode(Hello(PROTOCOL_VERSION, "me", (), None))
        if stage != "fresh":
            proto.decode(codec.encode(to_wire(AuthChallenge(SERVER_NONCE, bytes(32)))))
            proto.encode(AuthProof(bytes(32)))
        if stage.startswith("open"):
            proto.decode(codec.encode(to_wire(Welcome(PROTOCOL_VERSION, "peer", None, {},
                                                      ()))))
    proto.cipher = cipher
    return proto, peer


def check_round_trip(msg: Any, max_depth: int) -> None:
    """What we decoded, we can send back, and the peer reads the same message."""
    try:
        body = codec.encode(to_wire(msg))
    except codec.WireTypeError:
        return  # a value a receiver may hold but not send on (e.g. a CBOR simple value)
    try:
        again = from_wire(codec.decode(body, max_depth=max_depth + 1))
    except ProtocolError as exc:
        raise AssertionError(f"{msg!r} decoded, but its re-encoding does not: {exc}") from None
    assert type(again) is type(msg), (msg, again)
    assert codec.encode(to_wire(again)) == body, (msg, again)
    if _comparable(msg):
        assert again == msg, (msg, again)


def _comparable(value: Any) -> bool:
    """False for values that are not equal to themselves (NaN anywhere inside)."""
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, list | tuple | frozenset):
        return all(_comparable(v) for v in value)
    if isinstance(value, dict):
        return all(_comparable(k) and _comparable(v) for k, v in value.items())
    fields = getattr(type(value), "__attrs_attrs__", None)
    if fields is not None:
        return all(_comparable(getattr(value, f.name)) for f in fields)
    return True


class Feed:
    """A connection and its frame decoder, checked after every step."""

    def __init__(self, proto: ProtocolConnection, max_frame_size: int, max_depth: int):
        self.proto = proto
        self.decoder = FrameDecoder(max_frame_size)
        self.max_frame_size = max_frame_size
        self.max_depth = max_depth
        self.closed = False

    def bytes_in(self, chunk: bytes) -> list[bytes]:
        """Feed raw stream bytes; the complete frame bodies (ProtocolError closes)."""
        try:
            bodies = self.decoder.feed(chunk)
        except ProtocolError:
            self.closed = True
            return []
        assert isinstance(bodies, list)
        for body in bodies:
            assert isinstance(body, bytes) and len(body) <= self.max_frame_size, len(body)
        assert self.decoder.buffered <= 4 + self.max_frame_size, self.decoder.buffered
        return bodies

    def body_in(self, body: bytes) -> Message | None:
        """Decode one frame body: a valid message, or None after a ProtocolError."""
        proto = self.proto
        try:
            msg = proto.decode(body)
        except ProtocolError:
            assert proto.state is State.CLOSED, proto.state
            try:
                proto.decode(body)
            except ProtocolError:
                pass
            else:
                raise AssertionError("a closed connection decoded a frame") from None
            self.closed = True
            return None
        assert isinstance(msg, MESSAGE_TYPES), type(msg)
        check_round_trip(msg, self.max_depth)
        return msg


def run_one(data: bytes) -> None:
    """One fuzz input: see the module docstring."""
    r = Reader(data)
    head = r.byte()
    role, stage = SITUATIONS[head & 7]
    mode = head >> 3 & 3
    max_frame_size = FRAME_SIZES[head >> 5 & 3]
    max_depth = 1 + r.byte() % 80
    proto, peer = connection(role, stage, max_depth)
    feed = Feed(proto, max_frame_size, max_depth)

    if mode == 0:
        # a raw byte stream, in chunks: framing and everything above it
        for chunk in r.chunks():
            for body in feed.bytes_in(chunk):
                if feed.body_in(body) is None:
                    return
            if feed.closed:
                return
    elif mode == 1:
        # whole frame bodies, sealed by the peer when the session has a cipher, then
        # framed and split at input-chosen points
        wire = bytearray()
        while r.left():
            body = r.take(r.u16() % (max_frame_size + 8))
            wire += frame(body if peer is None else peer.seal(body))
        cut = 1 + r.byte()
        for start in range(0, len(wire), cut):
            for body in feed.bytes_in(bytes(wire[start:start + cut])):
                if feed.body_in(body) is None:
                    return
            if feed.closed:
                return
    elif mode == 2:
        # frame bodies straight to decode(), unsealed: the plaintext path, or (with a
        # cipher) garbage that must fail authentication
        for body in r.chunks():
            msg = feed.body_in(body)
            if msg is None:
                return
            assert peer is None, f"an unsealed frame passed the session cipher: {msg!r}"
    else:
        sealed_stream(r, feed, peer)


def sealed_stream(r: Reader, feed: Feed, peer: SessionCipher | None) -> None:
    """Frames the peer sealed in order, then tampered with: flipped bits, a frame
    replayed, two frames swapped, one dropped. Each frame must open if and only if it is
    byte for byte the frame the peer sealed at that position."""
    op = r.byte()
    bodies = [r.take(r.byte()) for _ in range(1 + op % 6)]
    sealed = [b if peer is None else peer.seal(b) for b in bodies]
    sent = list(sealed)
    i = r.byte() % len(sent)
    j = r.byte() % len(sent)
    kind = op >> 4 & 3
    if kind == 0 and sent[i]:
        flipped = bytearray(sent[i])
        flipped[r.byte() % len(flipped)] ^= 1 << (r.byte() & 7)
        sent[i] = bytes(flipped)
    elif kind == 1:
        sent.insert(j, sent[i])  # replay
    elif kind == 2:
        sent[i], sent[j] = sent[j], sent[i]  # reorder
    elif len(sent) > 1:
        del sent[i]  # drop
    for position, body in enumerate(sent):
        genuine = position < len(sealed) and body == sealed[position]
        msg = feed.body_in(body)
        if peer is not None and not genuine:
            assert msg is None, f"a tampered frame opened: {msg!r}"
        if msg is None:
            return


def sample_messages() -> list[Any]:
    """One or more of every message type, with the kinds of values calls carry."""
    import datetime
    import uuid

    from forkcore.grains import InterfaceInfo
    from forkcore.protocol import messages as m

    values: list[Any] = [None, True, -1, 2**70, 1.5, math.inf, "text", b"\x00\xff",
                         (1, "a"), uuid.UUID(int=7), datetime.datetime(2024, 5, 1, 12),
                         datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC),
                         {"k": [1, {"n": None}]}, [[[[]]]]]
    return [
        m.Hello(PROTOCOL_VERSION, "client-1", ("x",), None),
        m.Hello(PROTOCOL_VERSION, "c", (), {"method": "psk", "nonce": CLIENT_NONCE,
                                            "identity": "tools", "encrypt": True}),
        m.Hello(PROTOCOL_VERSION, "c", (), {"token": "t-admin"}),
        m.Hello(2, "future", (), None),
        m.Welcome(PROTOCOL_VERSION, "s1", "eu-1", {"service": "game"},
                  (InterfaceInfo("game.IPlayer", 2, frozenset({"move", "say"})),)),
        m.AuthChallenge(SERVER_NONCE, bytes(32)),
        m.AuthChallenge(SERVER_NONCE, bytes(32), False),
        m.AuthProof(bytes(32)),
        m.Request(1, "game.IPlayer", "p1", "move", values, {"fast": True}, 5.0),
        m.Request(2**63 - 1, "i", uuid.UUID(int=1), "m", [], {}, None),
        m.Request(3, "i", b"key", "m", [values[-1]], {}, 0.0),
        m.Response(1, values),
        m.Failure(1, m.FailureKind.REMOTE, "ValueError", "bad"),
        m.OneWay("game.IPlayer", 7, "say", ["hi"], {}),
        m.Ping(1, 0.25),
        m.Pong(1, 0.25),
        m.Goodbye("draining"),
        m.Cancel(1),
        m.StatsRequest(5),
        m.Stats(5, {"calls": 10, "in_flight": 0, "uptime": 1.5, "draining": False}),
    ]


def seeds() -> Iterator[tuple[str, bytes]]:
    """A starting corpus: every message, in every situation and delivery mode, plus a few
    classic hostile shapes (the CBOR decoder is native code the fuzzer cannot see into,
    so it needs well-formed examples to mutate)."""
    bodies = [codec.encode(to_wire(msg)) for msg in sample_messages()]
    hostile = [
        b"\x9b" + b"\xff" * 8,  # an array claiming 2**64-1 items
        b"\x5b" + b"\xff" * 8,  # a byte string claiming 2**64-1 bytes
        b"\xbb" + b"\x00" * 7 + b"\x10",  # a map claiming 16 pairs, none there
        b"\x81" * 200 + b"\x00",  # nesting deeper than any limit
        b"\xd9\x9c\x40\x82\x69os.system\xa0",  # a wire type nobody registered
        b"\xc2\x5a\x00\x01\x00\x00" + b"\x01" * 16,  # a bignum, cut short
        b"\x9f\x01\xff",  # indefinite length
    ]
    for situation in range(len(SITUATIONS)):
        for size in (2, 3):
            head = situation | size << 5
            for i, body in enumerate(bodies + hostile):
                if len(body) < 256:
                    yield (f"s{situation}-m2-{size}-{i}",
                           bytes([head | 2 << 3, 63, len(body)]) + body)
                framed = frame(body)
                stream = b"".join(bytes([len(framed[k:k + 200])]) + framed[k:k + 200]
                                  for k in range(0, len(framed), 200))
                yield f"s{situation}-m0-{size}-{i}", bytes([head, 63]) + stream
                yield (f"s{situation}-m1-{size}-{i}",
                       bytes([head | 1 << 3, 63]) + len(body).to_bytes(2, "big") + body)
            short = [b for b in bodies if len(b) < 256][:4]
            for op in (0x03, 0x13, 0x23, 0x33):
                yield (f"s{situation}-m3-{size}-{op:02x}",
                       bytes([head | 3 << 3, 63, op]) + b"".join(bytes([len(b)]) + b
                                                                   for b in short) + b"\x01\x00")


def make_corpus(directory: str) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, data in seeds():
        run_one(data)  # every seed must itself pass
        (out / name).write_bytes(data)
        count += 1
    print(f"wrote {count} seed inputs to {out}")


def replay(paths: list[str]) -> None:
    """Run saved inputs (files, or every file in a directory) without atheris."""
    files = [p for path in map(Path, paths)
             for p in (sorted(path.iterdir()) if path.is_dir() else [path])]
    for path in files:
        run_one(path.read_bytes())
    print(f"{len(files)} inputs ran cleanly")


def smoke(runs: int) -> None:
    """Without atheris: random inputs, for a quick check that the target works."""
    import random

    rng = random.Random(0)
    for _ in range(runs):
        run_one(rng.randbytes(rng.randrange(0, 512)))
    print(f"{runs} random inputs ran cleanly")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(sys.argv[2])
        return
    if atheris is None:
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        if args:
            replay(args)
        else:
            print("atheris is not installed (pip install atheris); running random inputs",
                  file=sys.stderr)
            smoke(int(os.environ.get("FUZZ_SMOKE_RUNS", "20000")))
        return
    atheris.Setup(sys.argv, run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
