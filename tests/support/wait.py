"""Waiting in tests on what the system reports (a version, a counter, a file), never on a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], object | Awaitable[object]], within: float = 10.0, what: str = "", every: float = 0.05
) -> None:
    """Poll `check` (plain or async) until it returns something truthy; AssertionError naming `what` after `within`
    seconds. Polling is for state with nothing to await (an API server, a file, another process)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or 'the condition'}")
        await asyncio.sleep(every)
