"""Registers transport `udp` with forkcore (entry point group `forkcore`)."""

from __future__ import annotations

from forkcore import hookimpl
from forkcore.interfaces import RegisterTransport

from .transport import UdpTransport


@hookimpl
def forkcore_register_transports(register: RegisterTransport) -> None:
    register("udp", UdpTransport)
