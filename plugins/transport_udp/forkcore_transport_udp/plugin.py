"""Registers transport `udp` with forkcore (entry point group `forkcore`)."""

from __future__ import annotations

from forkcore import hookimpl
from forkcore.hookspecs import Register

from .transport import UdpTransport


@hookimpl
def forkcore_register_transports(register: Register) -> None:
    register("udp", UdpTransport)
