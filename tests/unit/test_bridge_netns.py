"""Netns: connections to peer bridges from the node's namespace without a thread hop each."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ipsec_bridge import netns as netns_module
from ipsec_bridge.netns import TCP_FASTOPEN_CONNECT, Netns, NetnsError

OWN_NETNS = f"/proc/{os.getpid()}/ns/net"  # entered by the worker thread as any other namespace would be


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def _count_hops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    hops = [0]
    real = Netns.run

    async def counted(self: Netns, fn: Callable[[], Any]) -> Any:
        hops[0] += 1
        return await real(self, fn)

    monkeypatch.setattr(Netns, "run", counted)
    return hops


async def _connect_times(ns: Netns, port: int, n: int) -> None:
    for _ in range(n):
        _, writer = await ns.connect("127.0.0.1", port, 5, source="127.0.0.1")
        assert writer.get_extra_info("sockname")[0] == "127.0.0.1"
        writer.close()


def _namespace_of_this_thread() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


async def test_connections_from_a_namespace_are_made_on_the_loop_thread(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's socket is made in the namespace by the event loop's thread itself (no thread hop: 0.7-0.9 ms
    in UML), which enters the namespace for the socket() call only and is back in its own at once."""
    hops = _count_hops(monkeypatch)
    entered: list[int] = []
    real_setns = netns_module.setns_fd

    def counted_setns(fd: int) -> None:
        entered.append(fd)
        real_setns(fd)

    monkeypatch.setattr(netns_module, "setns_fd", counted_setns)
    before = _namespace_of_this_thread()
    ns = Netns(OWN_NETNS)
    try:
        await _connect_times(ns, port, 3)
        assert hops[0] == 0
        assert len(entered) == 6  # in and back, per connection
        assert _namespace_of_this_thread() == before
    finally:
        ns.close()


async def test_without_a_namespace_a_connection_makes_its_socket_in_place(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = _count_hops(monkeypatch)
    entered: list[int] = []
    monkeypatch.setattr(netns_module, "setns_fd", entered.append)
    ns = Netns(None)
    await _connect_times(ns, port, 3)
    assert hops[0] == 0 and entered == []
    ns.close()


async def test_a_namespace_that_is_gone_fails_the_connection_with_its_name(tmp_path: Path) -> None:
    ns = Netns(str(tmp_path / "gone"))
    with pytest.raises(NetnsError, match=r"cannot open network namespace .*gone"):
        await ns.connect("127.0.0.1", 9, 5)
    ns.close()


async def test_closing_closes_the_namespace_files(port: int) -> None:
    ns = Netns(OWN_NETNS)
    await _connect_times(ns, port, 1)
    before = len(os.listdir("/proc/self/fd"))
    ns.close()
    assert len(os.listdir("/proc/self/fd")) == before - 2
    with pytest.raises(NetnsError, match="closed"):
        await ns.connect("127.0.0.1", port, 5)


async def test_fast_open_sockets_carry_data_both_ways_whatever_the_kernel_allows() -> None:
    """With Fast Open asked for, the listener takes it and the connections ask for it; where the netns's sysctl
    does not allow it (this host's default is the client bit only) the kernel falls back to a plain connect."""
    ns = Netns(None)
    ns.fast_open = True
    listener = await ns.listen("127.0.0.1", 0)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, sock=listener)
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 256
        port = listener.getsockname()[1]
        for _ in range(3):  # the first asks for a cookie (where the server side is on), the next ones use it
            reader, writer = await ns.connect("127.0.0.1", port, 5, source="127.0.0.1")
            sock = writer.get_extra_info("socket")
            client_bit = int(Path("/proc/sys/net/ipv4/tcp_fastopen").read_text()) & 1  # noqa: ASYNC240 - /proc
            assert sock.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT) == client_bit
            writer.write(b"preamble+hello")
            assert await asyncio.wait_for(reader.read(100), 5) == b"preamble+hello"
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
        ns.close()


async def test_without_fast_open_no_socket_asks_for_it(port: int) -> None:
    ns = Netns(None)
    _, writer = await ns.connect("127.0.0.1", port, 5)
    assert writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT) == 0
    writer.close()
    ns.close()
