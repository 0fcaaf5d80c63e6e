"""How every ztdpu daemon starts and stops: logging, SIGINT/SIGTERM → graceful stop, one-line errors."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def _until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)


def _first_expected(err: BaseException, expected: tuple[type[BaseException], ...]) -> BaseException | None:
    # A failure inside a TaskGroup arrives wrapped in an ExceptionGroup; look inside it.
    if isinstance(err, expected):
        return err
    if isinstance(err, BaseExceptionGroup):
        for inner in err.exceptions:
            found = _first_expected(inner, expected)
            if found is not None:
                return found
    return None


def run_daemon(
    prog: str,
    run: Callable[[asyncio.Event], Awaitable[None]],
    *,
    log_level: str,
    expected: tuple[type[BaseException], ...],
) -> int:
    """Run `run(stop)` until it returns or a signal sets `stop`. Expected errors end the program with
    exit code 1 and one line naming the program; anything else is a bug and keeps its traceback."""
    configure_logging(log_level)
    try:
        asyncio.run(_until_signalled(run))
    except KeyboardInterrupt:
        return 130
    except BaseException as err:
        found = _first_expected(err, expected)
        if found is None:
            raise
        print(f"{prog}: {found}", file=sys.stderr)
        return 1
    return 0
