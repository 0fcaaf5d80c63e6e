"""Daemon start/stop: expected errors (also from inside a TaskGroup) end with one line and exit code 1."""

from __future__ import annotations

import asyncio

import pytest

from ztcore.daemon import run_daemon


class Expected(Exception):
    pass


async def fails_in_task_group(stop: asyncio.Event) -> None:
    async def boom() -> None:
        raise Expected("cannot read /etc/x: permission denied")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(boom())
        await stop.wait()


async def stops_cleanly(stop: asyncio.Event) -> None:
    stop.set()
    await stop.wait()


def test_expected_error_inside_a_task_group_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_daemon("demo", fails_in_task_group, log_level="error", expected=(Expected,)) == 1
    err = capsys.readouterr().err
    assert err == "demo: cannot read /etc/x: permission denied\n"


def test_clean_stop_is_exit_0() -> None:
    assert run_daemon("demo", stops_cleanly, log_level="error", expected=(Expected,)) == 0


def test_unexpected_errors_keep_their_traceback() -> None:
    async def bug(stop: asyncio.Event) -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_daemon("demo", bug, log_level="error", expected=(Expected,))
