"""The tests' in-process ztd: a port taken between free_port() and ztd's bind is picked again, not a failed test."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import tests.helpers as helpers


async def test_a_port_taken_before_ztd_binds_it_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        handed: list[int] = []
        real = helpers.free_port

        def free_port() -> int:
            port = taken if len(handed) == 2 else real()  # the first ztd's monitoring port is already in use
            handed.append(port)
            return port

        monkeypatch.setattr(helpers, "free_port", free_port)
        async with helpers.running_ztd(tmp_path) as rz:
            assert len(handed) == 6 and rz.cfg.monitoring_port not in (taken, handed[2])
