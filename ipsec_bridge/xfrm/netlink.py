"""Async NETLINK_XFRM sockets: requests with acks, dumps, batches and multicast notifications, in any netns.

The kernel does the work of a netlink request inside our sendmsg() and queues its answer before send returns.
Batches, dumps and the first SAs of a socket (crypto allocation, even a module load) run in a worker thread
(asyncio.to_thread) on a blocking socket. A few requests of the kinds that are microseconds of kernel work
(`_INLINE`: an SPI, a policy, an SA once the socket has installed one) run on the event loop instead: a
worker-thread hop costs 0.7-0.9 ms in UML (bench/thread_hop.py; 0.06 ms on the 2-vCPU host), and a handshake
makes five of them in a row. Notifications use a non-blocking socket read by the loop.

A socket belongs to the network namespace it was created in. `netns` (a name under /run/netns or a path such
as /proc/PID/ns/net) is entered by a short-lived helper thread that creates the socket and exits, so no
thread of ours stays in a foreign namespace.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ipsec_bridge.netns import netns_path, setns_fd
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import (
    AF_NETLINK,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_XFRM,
    SOL_NETLINK,
    NlmFlag,
    NlmsgType,
    XfrmGroup,
    XfrmMsg,
)
from ipsec_bridge.xfrm.offload import OffloadProbe, OffloadStatus, offload_status

_RECV_SIZE = 1 << 16  # the kernel sizes dump batches to at most 32 KiB; one datagram always fits
_SOCKET_BUFFER = 1 << 20
_MAX_BATCH_BYTES = 1 << 16
_DUMP_RETRIES = 3
_BACKLOG = 1024  # notifications decoded but not yet taken before XfrmEvents stops reading its socket
_INLINE_MAX = 8  # at most this many requests on the event loop at once (a pod pair handshake's SAs and policies)
_INLINE = frozenset({
    XfrmMsg.ALLOCSPI, XfrmMsg.GETSA, XfrmMsg.DELSA, XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY, XfrmMsg.DELPOLICY,
    XfrmMsg.GETPOLICY,
})  # fmt: skip
_SA_WRITES = frozenset({XfrmMsg.NEWSA, XfrmMsg.UPDSA})  # inline once the socket has installed one (warm crypto)


class XfrmError(Exception):
    """The kernel refused a request: names the operation, the errno and the kernel's own message."""

    def __init__(self, op: str, err: int, kernel_message: str | None = None, hint: str | None = None) -> None:
        self.op = op
        self.errno = err
        self.kernel_message = kernel_message
        self.hint = hint
        text = f"{op} failed: {m.errno_text(err, kernel_message)}"
        super().__init__(f"{text} ({hint})" if hint else text)


class XfrmBatchError(XfrmError):
    """Some requests of a batch failed; the others were applied (netlink processes every message of a batch)."""

    def __init__(self, failures: Sequence[tuple[int, XfrmError]], total: int) -> None:
        self.failures = list(failures)
        first_index, first = self.failures[0]
        more = f"; {len(self.failures) - 1} more of {total} failed" if len(self.failures) > 1 else ""
        super().__init__(f"{first.op} (request {first_index + 1} of {total})", first.errno, first.kernel_message)
        self.args = (f"{self.args[0]}{more}",)


_IMPLIED_ACK = m.NetlinkAck(0)  # no refusal came before a later request's answer


@dataclass(slots=True)
class _Outcome:
    replies: list[m.NetlinkMessage] = field(default_factory=list)
    ack: m.NetlinkAck | None = None
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class EventsLost:
    """The notification socket overflowed (ENOBUFS): some events are gone; re-read the kernel state."""


# ---------------------------------------------------------------------------------------------------------------
# socket creation (blocking: call through asyncio.to_thread)


def _make_socket(groups: Iterable[int], nonblocking: bool) -> socket.socket:
    try:
        sock = socket.socket(AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_XFRM)
    except OSError as exc:
        hint = "is the xfrm_user module loaded?" if exc.errno == errno.EPROTONOSUPPORT else None
        raise XfrmError("open NETLINK_XFRM socket", exc.errno or errno.EIO, None, hint) from exc
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # the kernel explains its refusals
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks don't echo our request (which may hold keys)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, int(group))
        sock.setblocking(not nonblocking)
    except OSError as exc:
        sock.close()
        raise XfrmError("set up NETLINK_XFRM socket", exc.errno or errno.EIO) from exc
    return sock


def open_socket(netns: str | None = None, groups: Iterable[int] = (), nonblocking: bool = False) -> socket.socket:
    """Create a NETLINK_XFRM socket, inside `netns` if given. Blocking; use asyncio.to_thread."""
    groups = list(groups)
    if netns is None:
        return _make_socket(groups, nonblocking)
    path = netns_path(netns)
    box: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns_fd(fd)
            finally:
                os.close(fd)
            box.append(_make_socket(groups, nonblocking))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    # A thread of its own: setns changes the calling thread for good, and this one ends right after.
    worker = threading.Thread(target=enter_and_create, name=f"xfrm-netns-{netns}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, XfrmError):
            raise exc
        err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        raise XfrmError(f"enter network namespace {netns!r} ({path})", err) from exc
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# requests


class XfrmSocket:
    """Request/response on NETLINK_XFRM. Safe to share between tasks: requests are serialized."""

    def __init__(self, sock: socket.socket, *, reply_timeout: float = 10.0, netns: str | None = None) -> None:
        self._sock = sock
        # the kernel enforces the timeout (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket: a Python-level timeout
        # would poll() and read the clock before every send and receive
        sock.settimeout(None)
        seconds = int(reply_timeout)
        timeval = struct.pack("@ll", seconds, int((reply_timeout - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._timeout = reply_timeout
        self._thread_lock = threading.Lock()  # a cancelled caller's thread may still be talking to the kernel
        self._seq = 0
        self._sa_warm = False  # an SA went in: the kernel has its crypto loaded, SA writes may run inline
        self.netns = netns

    @classmethod
    async def open(cls, netns: str | None = None, *, reply_timeout: float = 10.0) -> XfrmSocket:
        sock = await asyncio.to_thread(open_socket, netns)
        return cls(sock, reply_timeout=reply_timeout, netns=netns)

    def close(self) -> None:
        self._sock.close()

    async def __aenter__(self) -> XfrmSocket:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # --- generic ---

    async def _run(self, requests: list[m.Request], window: int) -> list[_Outcome]:
        """`_exchange` on the event loop when the requests are few and cheap and no worker thread is talking to
        the kernel on this socket (never wait for one here), else in a worker thread."""
        if self.runs_inline(requests) and self._thread_lock.acquire(blocking=False):
            try:
                return self._exchange_locked(requests, window)
            finally:
                self._thread_lock.release()
        outcomes = await asyncio.to_thread(self._exchange, requests, window)
        if not self._sa_warm:
            self._sa_warm = any(r.type in _SA_WRITES and o.ack is not None and o.ack.ok
                                for r, o in zip(requests, outcomes, strict=True))  # fmt: skip
        return outcomes

    def runs_inline(self, requests: Sequence[m.Request]) -> bool:
        """Whether these requests would go to the kernel on the event loop, without a suspension (unless a worker
        thread is talking to the kernel on this socket right now)."""
        cheap = len(requests) <= _INLINE_MAX and all(self._inline(r) for r in requests)
        return cheap and not self._thread_lock.locked()

    def _inline(self, request: m.Request) -> bool:
        return request.type in _INLINE or (self._sa_warm and request.type in _SA_WRITES)

    async def call(self, request: m.Request) -> list[m.NetlinkMessage]:
        """Send one request; return the kernel's replies (not the ack). Raises XfrmError on refusal."""
        (outcome,) = await self._run([request], 1)
        _raise_for(request, outcome)
        return outcome.replies

    async def call_many(self, requests: Sequence[m.Request], *, window: int = 64) -> None:
        """Send many requests, `window` per datagram; raise XfrmBatchError listing every refusal."""
        if not requests:
            return
        outcomes = await self._run(list(requests), max(1, window))
        failures: list[tuple[int, XfrmError]] = []
        for index, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
            try:
                _raise_for(request, outcome)
            except XfrmError as exc:
                failures.append((index, exc))
        if failures:
            raise XfrmBatchError(failures, len(requests))

    async def call_each(
        self, requests: Sequence[m.Request], *, window: int = 64
    ) -> list[list[m.NetlinkMessage] | XfrmError]:
        """Send many requests, `window` per datagram; for each, its replies or its refusal (no raise)."""
        if not requests:
            return []
        outcomes = await self._run(list(requests), max(1, window))
        results: list[list[m.NetlinkMessage] | XfrmError] = []
        for request, outcome in zip(requests, outcomes, strict=True):
            try:
                _raise_for(request, outcome)
                results.append(outcome.replies)
            except XfrmError as exc:
                results.append(exc)
        return results

    async def dump(self, request: m.Request) -> list[m.NetlinkMessage]:
        """Run a dump to its end; restart it when the kernel flags it as interrupted by a concurrent change."""
        for _ in range(_DUMP_RETRIES):
            (outcome,) = await asyncio.to_thread(self._exchange, [request], 1)
            _raise_for(request, outcome)
            if not outcome.interrupted:
                return outcome.replies
        raise XfrmError(request.what, errno.EAGAIN, f"dump interrupted {_DUMP_RETRIES} times by concurrent changes")

    # --- SAs ---

    async def add_sa(self, sa: m.SecurityAssociation, *, update: bool = False) -> None:
        await self.call(m.new_sa(sa, update=update))

    async def add_sas(self, sas: Sequence[m.SecurityAssociation], *, update: bool = False, window: int = 64) -> None:
        # encoding thousands of SAs is tens of milliseconds or more of CPU: not on the event loop
        requests = await asyncio.to_thread(m.new_sas, sas, update=update)
        await self.call_many(requests, window=window)

    async def install_sa(self, sa: m.SecurityAssociation, *, update: bool = False) -> OffloadStatus:
        """Add an SA, read it back and report the offload it really got (crypto offload may fall back)."""
        await self.add_sa(sa, update=update)
        if sa.offload is None:
            return OffloadStatus.NONE
        installed = await self.get_sa(sa.id())
        status = offload_status(sa.offload, installed.sa.offload)
        if sa.offload.is_packet and status is OffloadStatus.FALLBACK:
            await self.delete_sa(sa.id())
            raise XfrmError(
                f"NEWSA {sa.describe()}", errno.EOPNOTSUPP, "the kernel accepted packet offload but did not offload"
            )
        return status

    async def get_sa(self, sa_id: m.SaId) -> m.SaInfo:
        replies = await self.call(m.get_sa(sa_id))
        found = m.decode_sas(replies)
        if len(found) != 1:
            raise XfrmError(
                f"GETSA {sa_id.describe()}", errno.EPROTO, f"expected one SA in the reply, got {len(found)}"
            )
        return found[0]

    async def list_sas(self) -> list[m.SaInfo]:
        # decoding a large dump costs ~0.2 ms per SA: off the event loop
        return await asyncio.to_thread(m.decode_sas, await self.dump(m.dump_sa()))

    async def sa_counters(self) -> list[m.SaCounters]:
        """Every SA's destination, SPI, mark and counters: a dump without the cost of decoding keys and algorithms."""
        return await asyncio.to_thread(m.decode_sas_counters, await self.dump(m.dump_sa()))

    async def delete_sa(self, sa_id: m.SaId) -> None:
        await self.call(m.delete_sa(sa_id))

    async def delete_sas(self, sa_ids: Sequence[m.SaId], *, window: int = 64) -> None:
        requests = await asyncio.to_thread(lambda: [m.delete_sa(i) for i in sa_ids])
        await self.call_many(requests, window=window)

    async def alloc_spi(self, request: m.SpiRequest) -> m.SaInfo:
        """Reserve an SPI (a larval SA); install the real SA with add_sa(..., update=True)."""
        replies = await self.call(m.alloc_spi(request))
        found = m.decode_sas(replies)
        if len(found) != 1:
            raise XfrmError("ALLOCSPI", errno.EPROTO, f"expected one SA in the reply, got {len(found)}")
        return found[0]

    async def flush_sas(self) -> None:
        await self.call(m.flush_sa())

    # --- policies ---

    async def add_policy(self, policy: m.Policy, *, update: bool = False) -> None:
        await self.call(m.new_policy(policy, update=update))

    async def add_policies(self, policies: Sequence[m.Policy], *, update: bool = False, window: int = 64) -> None:
        requests = await asyncio.to_thread(lambda: [m.new_policy(p, update=update) for p in policies])
        await self.call_many(requests, window=window)

    async def install_policy(self, policy: m.Policy, *, update: bool = False) -> OffloadStatus:
        """Add a policy; with packet offload, read it back and fail if the kernel ignored the offload (< 6.2)."""
        await self.add_policy(policy, update=update)
        if policy.offload is None:
            return OffloadStatus.NONE
        installed = await self.get_policy(policy.id())
        status = offload_status(policy.offload, installed.policy.offload)
        if status is OffloadStatus.FALLBACK:
            await self.delete_policy(policy.id())
            raise XfrmError(
                f"NEWPOLICY {policy.describe()}",
                errno.EOPNOTSUPP,
                "the kernel ignored the packet offload request (policy offload needs Linux >= 6.2)",
            )
        return status

    async def get_policy(self, pid: m.PolicyId) -> m.PolicyInfo:
        replies = await self.call(m.get_policy(pid))
        found = m.decode_policies(replies)
        if len(found) != 1:
            raise XfrmError(f"GETPOLICY {pid.describe()}", errno.EPROTO, f"expected one policy, got {len(found)}")
        return found[0]

    async def list_policies(self) -> list[m.PolicyInfo]:
        return await asyncio.to_thread(m.decode_policies, await self.dump(m.dump_policy()))

    async def delete_policy(self, pid: m.PolicyId) -> None:
        await self.call(m.delete_policy(pid))

    async def flush_policies(self) -> None:
        await self.call(m.flush_policy())

    # --- the blocking part (runs in a worker thread) ---

    def _exchange(self, requests: Sequence[m.Request], window: int) -> list[_Outcome]:
        with self._thread_lock:
            return self._exchange_locked(requests, window)

    def _exchange_locked(self, requests: Sequence[m.Request], window: int) -> list[_Outcome]:
        """Each datagram asks for an ack on its last request only (a dump always ends in DONE): the kernel handles
        a datagram's messages in order and answers a refusal whether asked or not, so the last one's ack also
        says that every earlier request without a refusal succeeded. One read per datagram instead of one per
        request."""
        outcomes = [_Outcome() for _ in requests]
        start = 0
        while start < len(requests):
            chunk: list[tuple[int, int, bytes]] = []  # (seq, index, encoded)
            size = 0
            index = start
            while index < len(requests) and index - start < window:
                self._seq = self._seq % 0xFFFF_FFFF + 1
                encoded = requests[index].encode(self._seq, ack=False)
                if chunk and size + len(encoded) > _MAX_BATCH_BYTES:
                    break
                chunk.append((self._seq, index, encoded))
                size += len(encoded)
                index += 1
            last_seq, last_index, _ = chunk[-1]
            chunk[-1] = (last_seq, last_index, requests[last_index].encode(last_seq))
            self._send(b"".join(e for _, _, e in chunk), requests[start])
            self._collect([(seq, i) for seq, i, _ in chunk], outcomes, requests)
            start = index
        return outcomes

    def _send(self, datagram: bytes, first: m.Request) -> None:
        try:
            self._sock.send(datagram)
        except OSError as exc:
            raise XfrmError(first.what, exc.errno or errno.EIO, "sending to the kernel failed") from exc

    def _collect(self, sent: list[tuple[int, int]], outcomes: list[_Outcome], requests: Sequence[m.Request]) -> None:
        """Read until the datagram's last request is answered. `sent`: (seq, request index), in sending order."""
        position = {seq: pos for pos, (seq, _) in enumerate(sent)}
        settled = 0  # every request before this position has its ack (a real one, or implied by a later answer)
        first = requests[sent[0][1]]
        while settled < len(sent):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except (TimeoutError, BlockingIOError) as exc:  # SO_RCVTIMEO ran out
                raise XfrmError(first.what, errno.ETIMEDOUT, f"no answer from the kernel in {self._timeout}s") from exc
            except OSError as exc:
                raise XfrmError(first.what, exc.errno or errno.EIO, "receiving from the kernel failed") from exc
            for msg in m.decode_nlmsgs(data):
                pos = position.get(msg.seq)
                if pos is None:
                    continue  # left over from a request whose caller was cancelled
                outcome = outcomes[sent[pos][1]]
                if msg.type == NlmsgType.ERROR:
                    outcome.ack = m.decode_ack(msg)
                elif msg.type == NlmsgType.DONE:
                    outcome.ack = m.decode_done(msg)
                    outcome.interrupted |= bool(msg.flags & NlmFlag.DUMP_INTR)
                elif msg.type not in (NlmsgType.NOOP, NlmsgType.OVERRUN):
                    outcome.replies.append(msg)
                    outcome.interrupted |= bool(msg.flags & NlmFlag.DUMP_INTR)
                    continue
                else:
                    continue
                # an answer that ends request `pos`: the kernel is done with everything sent before it, and what
                # it did not refuse there succeeded
                for _, index in sent[settled:pos]:
                    if outcomes[index].ack is None:
                        outcomes[index].ack = _IMPLIED_ACK
                settled = max(settled, pos + 1)


def _raise_for(request: m.Request, outcome: _Outcome) -> None:
    if outcome.ack is None:
        raise XfrmError(request.what, errno.EPROTO, "the kernel sent no ack")
    if not outcome.ack.ok:
        raise XfrmError(request.what, outcome.ack.error, outcome.ack.message, request.hint)


# ---------------------------------------------------------------------------------------------------------------
# notifications


class XfrmEvents:
    """Multicast notifications (EXPIRE, ACQUIRE, SA and POLICY changes) from one netns.

    Iterate it: each item is a decoded event, or EventsLost when the socket overflowed.
    """

    DEFAULT_GROUPS = (XfrmGroup.ACQUIRE, XfrmGroup.EXPIRE, XfrmGroup.SA, XfrmGroup.POLICY)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._queue: collections.deque[m.Event | EventsLost] = collections.deque()
        # The socket stays registered with the loop between events (loop.sock_recv registers and unregisters it
        # per read: two epoll_ctl and an empty recv per event); reading pauses while `_BACKLOG` events wait
        # unread, so a reader that falls behind leaves them in the kernel's buffer (bounded; overflow is
        # EventsLost), not in ours.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, groups: Iterable[XfrmGroup] = DEFAULT_GROUPS, netns: str | None = None) -> XfrmEvents:
        sock = await asyncio.to_thread(open_socket, netns, [int(g) for g in groups], True)
        return cls(sock)

    def close(self) -> None:
        if self._reading and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._reading = False
        self._sock.close()

    async def __aenter__(self) -> XfrmEvents:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> XfrmEvents:
        return self

    async def __anext__(self) -> m.Event | EventsLost:
        return await self.next()

    async def next(self) -> m.Event | EventsLost:
        while not self._queue:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if not self._reading:
                self._loop.add_reader(self._fd, self._readable)
                self._reading = True
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def _readable(self) -> None:
        """All the kernel has sent (a burst of ACQUIREs is taken in one go, not one datagram per loop turn), up to
        the backlog; then wake the reader."""
        self._read_sent(_BACKLOG)
        if self._waiter is not None and not self._waiter.done() and self._queue:
            self._waiter.set_result(None)
        if len(self._queue) >= _BACKLOG and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def ready_now(self) -> list[m.Event | EventsLost]:
        """The events the kernel has sent that `next` has not returned yet, without waiting: for a reader that must
        not act on a stale picture (an ACQUIRE is sent in the same syscall that queues its packet). A `next` waiting
        at the same time is safe: its callback finds nothing left and waits for more."""
        self._read_sent(None)
        out = list(self._queue)
        self._queue.clear()
        return out

    def _read_sent(self, backlog: int | None) -> None:
        """Decode what the socket holds into the queue without waiting, until it is empty or the queue holds
        `backlog` events (None: no bound). A read error (an overflow) is queued as EventsLost, and reading goes on."""
        while backlog is None or len(self._queue) < backlog:
            try:
                data = self._sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._queue.append(_lost(exc))
                continue
            self._decode(data)

    def _decode(self, data: bytes) -> None:
        for msg in m.decode_nlmsgs(data):
            if msg.type in (NlmsgType.NOOP, NlmsgType.ERROR, NlmsgType.DONE, NlmsgType.OVERRUN):
                continue
            self._queue.append(m.decode_event(msg))


def _lost(exc: OSError) -> EventsLost:
    """A notification socket's receive error: ENOBUFS means it overflowed (events were lost), anything else is fatal."""
    if exc.errno == errno.ENOBUFS:
        return EventsLost()
    raise XfrmError("receive XFRM notifications", exc.errno or errno.EIO) from exc


async def probe_offload(xfrm: XfrmSocket, sa: m.SecurityAssociation, device: str, mode: str) -> OffloadProbe:
    """Install `sa` (built like a tunnel's SA, on documentation addresses), read back its offload, delete it."""
    try:
        status = await xfrm.install_sa(sa)
    except XfrmError as err:
        # xfrm_dev_state_add(): "Device doesn't support offload with ESN"
        esn_refused = sa.esn and err.errno == errno.EINVAL and "ESN" in (err.kernel_message or "")
        return OffloadProbe(mode, device, None, str(err), sa.esn, esn_refused)
    with contextlib.suppress(XfrmError):
        await xfrm.delete_sa(sa.id())
    return OffloadProbe(mode, device, status, esn=sa.esn)
