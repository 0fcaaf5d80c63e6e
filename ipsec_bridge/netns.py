"""Sockets in the node's network namespace (--netns) while the process itself stays where it is.

A socket belongs to the namespace it was created in, whatever thread uses it later. The connections to peer
bridges are made on the event loop's own thread: it enters the namespace for the socket() call and comes back
within the same synchronous call, so nothing else runs on it meanwhile (two setns syscalls). Everything else the
bridge needs there (the handshake listener, per-namespace /proc files) goes through one worker thread that
entered the namespace once. The CA, xDS and admin connections stay in the process's own namespace.

Why not the worker thread for connections too: a thread hop costs 0.7-0.9 ms in UML (bench/thread_hop.py), and a
stock of sockets that thread made ahead (what this did before) was refilled while handshakes ran, each socket a
GIL handoff with the loop: ~20 futex calls per new pair on the initiating bridge in UML.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
# TCP Fast Open (RFC 7413). Python 3.11's socket module lacks TCP_FASTOPEN_CONNECT (linux/tcp.h, Linux 4.11).
TCP_FASTOPEN_CONNECT = 30
_FAST_OPEN_QUEUE = 256  # SYNs with data the listener takes before their handshake completes; more fall back


class NetnsError(OSError):
    """A namespace that cannot be opened or entered (an OSError: a handshake that meets one fails as IO does)."""


def netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join("/run/netns", netns)


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` refers to (os.setns from Python 3.12, libc before)."""
    setns = getattr(os, "setns", None)
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    if _libc_setns()(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@functools.cache
def _libc_setns() -> Any:
    """libc's setns, looked up once: a connection's socket enters and leaves the namespace with it."""
    return ctypes.CDLL(None, use_errno=True).setns


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_fd(fd)
    finally:
        os.close(fd)


class Netns:
    """`run(fn)` executes fn inside the namespace (or right here when netns is None)."""

    def __init__(self, netns: str | None) -> None:
        self.name = netns
        # Connections to peer bridges open with TCP Fast Open, and the listener takes it: a connection's first
        # write (the preamble and the ClientHello) rides in its SYN once the kernel holds the peer's cookie. Set
        # before the first connection and the listener (main turns it on with the namespace's sysctl).
        self.fast_open = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if netns is not None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{netns}", initializer=_enter, initargs=(netns_path(netns),)
            )
        self._here: int | None = None  # the loop thread's own namespace, opened on its first connection
        self._there: int | None = None  # the target namespace (fds: a namespace cannot go away under us)
        self._closed = False

    async def run(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            return await asyncio.to_thread(fn)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except concurrent.futures.BrokenExecutor:
            raise NetnsError(f"cannot enter network namespace {self.name!r} ({netns_path(self.name or '')})") from None

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for fd in (self._here, self._there):
            if fd is not None:
                os.close(fd)
        self._here = self._there = None

    def _tcp_socket(self, family: int) -> socket.socket:
        """A new TCP socket of the namespace, made on the calling thread (see the module docstring)."""
        if self.name is None:
            return _tcp(family, self.fast_open)
        if self._closed:
            raise NetnsError(f"network namespace {self.name!r}: closed")
        if self._there is None:
            try:
                self._there = os.open(netns_path(self.name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise NetnsError(f"cannot open network namespace {self.name!r}: {err.strerror}") from None
        if self._here is None:
            self._here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns_fd(self._there)
        except OSError as err:
            raise NetnsError(f"cannot enter network namespace {self.name!r}: {err.strerror}") from None
        try:
            return _tcp(family, self.fast_open)
        finally:
            try:
                setns_fd(self._here)
            except OSError as err:  # never seen: a thread may always go back to the namespace it came from
                # this thread would make its next sockets in the node's namespace: stop rather than go on
                raise SystemExit(f"zt-bridge: cannot leave network namespace {self.name!r}: {err.strerror}") from None

    async def check(self) -> None:
        """Fail early, with the reason, when the namespace cannot be entered."""
        if self.name is None:
            return
        path = netns_path(self.name)
        if not await asyncio.to_thread(os.path.exists, path):
            raise NetnsError(f"network namespace {self.name!r} does not exist ({path})")
        await self.run(lambda: None)

    async def listen(self, host: str, port: int, backlog: int = 512) -> socket.socket:
        fast_open = self.fast_open

        def make() -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # accepted sockets inherit it: without it the responder's accept waits behind its ticket segment
                # for the initiator's delayed ACK (30-40 ms per handshake, measured in UML)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if fast_open:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, _FAST_OPEN_QUEUE)
                sock.bind((host, port))
                sock.listen(backlog)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            return sock

        return await self.run(make)

    async def connect(
        self, host: str, port: int, connect_s: float, source: str | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection from the namespace; `source` pins the local address (the peer checks it). With Fast
        Open and the peer's cookie, the connect returns at once and the SYN leaves with the first write."""
        sock = self._tcp_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            if source is not None:
                sock.bind((source, 0))  # in the socket's namespace, whichever thread asks
            async with asyncio.timeout(connect_s):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def read_proc_net(self, name: str) -> str:
        """/proc/net/<name> of the namespace (thread-self: the calling thread's namespace, not the process's)."""

        def read() -> str:
            with open(f"/proc/thread-self/net/{name}", encoding="ascii") as f:
                return f.read()

        return await self.run(read)

    async def ifindex(self, dev: str) -> int:
        return await self.run(lambda: socket.if_nametoindex(dev))


def _tcp(family: int, fast_open: bool) -> socket.socket:
    """A non-blocking TCP socket with Nagle off, in the calling thread's namespace."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if fast_open:
            # EOPNOTSUPP once someone cleared the sysctl's client bit: an ordinary connect then
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    except BaseException:
        sock.close()
        raise
    return sock
