"""Caller mistakes are the caller's TypeError, raised locally as Python would, before
anything is sent; right calls cost one comparison."""

from __future__ import annotations

import pytest

import forkcore

pytestmark = pytest.mark.anyio


class IShop(forkcore.GrainInterface, name="args.shop"):
    async def buy(self, item: str, count: int = 1) -> str: ...
    async def tag(self, *tags: str) -> int: ...
    async def order(self, item: str, *, express: bool) -> str: ...


class Shop(forkcore.Grain, IShop):
    calls = 0

    async def buy(self, item: str, count: int = 1) -> str:
        Shop.calls += 1
        return f"{count} {item}"

    async def tag(self, *tags: str) -> int:
        Shop.calls += 1
        return len(tags)

    async def order(self, item: str, *, express: bool) -> str:
        Shop.calls += 1
        return f"{item}{'!' if express else ''}"


async def test_wrong_calls_raise_type_error_locally_and_send_nothing() -> None:
    async with forkcore.Server(id="a1", transport="memory", grains=[Shop]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""], transport="memory") as c:
            shop = c.get_grain(IShop, "s")
            before = Shop.calls
            wrong: list[tuple[tuple[object, ...], dict[str, object], str]] = [
                ((), {}, "missing a required argument: 'item'"),
                (("a", 1, 2), {}, "too many positional arguments"),
                (("a",), {"colour": "red"}, "unexpected keyword argument 'colour'"),
                (("a",), {"item": "b"}, "multiple values for argument 'item'"),
            ]
            for args, kwargs, message in wrong:
                with pytest.raises(TypeError, match=message) as caught:
                    await shop.buy(*args, **kwargs)  # type: ignore[arg-type, misc]
                assert "IShop.buy()" in str(caught.value)
            with pytest.raises(TypeError, match="missing a required argument: 'express'"):
                await shop.order("x")  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                await c.call("args.shop", "s", "buy", "a", nope=1)
            assert Shop.calls == before  # nothing reached the grain
            assert await shop.buy("apple") == "1 apple"
            assert await shop.buy("apple", count=3) == "3 apple"
            assert await shop.buy(item="pear") == "1 pear"
            assert await shop.tag() == 0 and await shop.tag("a", "b", "c") == 3
            assert await shop.order("x", express=True) == "x!"
            assert await c.call("args.shop", "s", "buy", "fig", 2) == "2 fig"
