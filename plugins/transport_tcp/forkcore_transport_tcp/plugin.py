"""Registers transport `tcp` with forkcore (entry point group `forkcore`)."""

from __future__ import annotations

from forkcore import hookimpl
from forkcore.hookspecs import Register

from .transport import TcpTransport


@hookimpl
def forkcore_register_transports(register: Register) -> None:
    register("tcp", TcpTransport)
