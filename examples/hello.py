"""The README's example: a grain, a server and a client in one file (`python examples/hello.py`)."""

import anyio

import forkcore


class IGreeter(forkcore.GrainInterface, name="greeter"):
    async def greet(self, name: str) -> str: ...


class Greeter(forkcore.Grain, IGreeter):
    async def greet(self, name: str) -> str:
        return f"hello {name}, from grain {self.key}"


async def main() -> None:
    async with forkcore.Server(id="s1", grains=[Greeter]) as server:
        async with forkcore.Client(servers=[server.endpoint]) as client:
            print(await client.get_grain(IGreeter, "g1").greet("world"))


anyio.run(main)
