"""The netlink request machinery of ipsec_bridge.xfrm.netlink over a real socket pair.

The peer here plays the kernel with scripted answers, to pin what a real kernel rarely does on demand:
interrupted dumps, stale replies, silence, failures in the middle of a batch. The same code runs against a real
6.1 kernel in tests/kernel/test_xfrm_kernel.py.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from ipaddress import ip_address

import pytest

from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import NlmFlag, NlmsgErrAttr, NlmsgType, PolicyDir, XfrmMsg
from ipsec_bridge.xfrm.netlink import EventsLost, XfrmBatchError, XfrmError, XfrmEvents, XfrmSocket, open_socket
from tests.support.xfrm_samples import kernel_sa_v4_payload, policy_v4, sa_v4

Answer = Callable[[m.NetlinkMessage], list[bytes]]


def ack(req: m.NetlinkMessage, err: int = 0, text: str | None = None) -> bytes:
    tlvs = m.encode_attr(NlmsgErrAttr.MSG, text.encode() + b"\0") if text else b""
    flags = NlmFlag.CAPPED | (NlmFlag.ACK_TLVS if text else 0)
    echoed = struct.pack("=IHHII", 16 + len(req.payload), req.type, req.flags, req.seq, req.pid)
    return m.encode_nlmsg(NlmsgType.ERROR, flags, req.seq, struct.pack("=i", -err) + echoed + tlvs)


def _success(reply: bytes) -> bool:
    (answer,) = m.decode_nlmsgs(reply)
    return answer.type == NlmsgType.ERROR and m.decode_ack(answer).ok


class FakeKernel:
    """Answers each datagram's messages with `answer`; records datagrams as they arrive."""

    def __init__(self, answer: Answer) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.answer = answer
        self.datagrams: list[list[m.NetlinkMessage]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data = self.theirs.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            msgs = m.decode_nlmsgs(data)
            self.datagrams.append(msgs)
            # as the kernel does: a success is acked only when the request asked (NLM_F_ACK), a refusal always
            out = b"".join(
                reply for msg in msgs for reply in self.answer(msg) if msg.flags & NlmFlag.ACK or not _success(reply)
            )
            if out:
                self.theirs.send(out)

    def close(self) -> None:
        self.theirs.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv()
        self.thread.join(2)
        self.theirs.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Answer], tuple[FakeKernel, XfrmSocket]]]:
    made: list[tuple[FakeKernel, XfrmSocket]] = []

    def make(answer: Answer, reply_timeout: float = 2.0) -> tuple[FakeKernel, XfrmSocket]:
        kernel = FakeKernel(answer)
        made.append((kernel, XfrmSocket(kernel.ours, reply_timeout=reply_timeout)))
        return made[-1]

    yield make
    for kernel, sock in made:
        sock.close()
        kernel.close()


async def test_request_ack_and_stale_replies_ignored(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    def answer(req: m.NetlinkMessage) -> list[bytes]:
        stale = ack(m.NetlinkMessage(req.type, req.flags, req.seq + 1000, 0, b""), errno.EPERM)
        return [stale, ack(req)]

    kernel, xs = fake(answer)
    await xs.add_sa(sa_v4())
    await xs.add_policy(policy_v4())
    sent = [msg for d in kernel.datagrams for msg in d]
    assert [msg.type for msg in sent] == [XfrmMsg.NEWSA, XfrmMsg.NEWPOLICY]
    assert sent[0].seq != sent[1].seq and sent[0].payload == m.encode_sa(sa_v4())


async def test_refusal_names_operation_errno_and_kernel_text(
    fake: Callable[..., tuple[FakeKernel, XfrmSocket]],
) -> None:
    _, xs = fake(lambda req: [ack(req, errno.EINVAL, "Unrecognized flags in offload request")])
    packet = m.SecurityAssociation(
        sa_v4().src, sa_v4().dst, 0x2002, sa_v4().aead, sa_v4().selector, offload=m.Offload.packet(3)
    )
    with pytest.raises(XfrmError) as caught:
        await xs.add_sa(packet)
    text = str(caught.value)
    assert text.startswith("NEWSA esp spi 0x00002002 192.0.2.1 -> 192.0.2.2 reqid 0 failed: Invalid argument (EINVAL)")
    assert "Unrecognized flags in offload request" in text and "no software fallback" in text
    assert caught.value.errno == errno.EINVAL


async def test_get_sa_decodes_the_reply(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    def answer(req: m.NetlinkMessage) -> list[bytes]:
        return [m.encode_nlmsg(XfrmMsg.NEWSA, 0, req.seq, kernel_sa_v4_payload()), ack(req)]

    _, xs = fake(answer)
    info = await xs.get_sa(sa_v4().id())
    assert info.sa == sa_v4() and info.current.packets == 2


async def test_batch_is_windowed_and_reports_every_failure(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    def answer(req: m.NetlinkMessage) -> list[bytes]:
        spi = int.from_bytes(req.payload[72:76], "big")
        return [ack(req, errno.EEXIST if spi in (7, 33) else 0)]

    kernel, xs = fake(answer)
    sas = [m.SecurityAssociation(sa_v4().src, sa_v4().dst, spi, sa_v4().aead, sa_v4().selector) for spi in range(50)]
    with pytest.raises(XfrmBatchError) as caught:
        await xs.add_sas(sas, window=16)
    assert [index for index, _ in caught.value.failures] == [7, 33]
    assert "request 8 of 50" in str(caught.value) and "1 more of 50 failed" in str(caught.value)
    assert [len(d) for d in kernel.datagrams] == [16, 16, 16, 2]  # every request was sent, 16 per datagram
    # each datagram asks for one ack, on its last request: the kernel's answer to it implies the silent successes
    assert [[bool(msg.flags & NlmFlag.ACK) for msg in d] for d in kernel.datagrams] == [
        [False] * (len(d) - 1) + [True] for d in kernel.datagrams
    ]


async def test_silent_successes_keep_their_replies_and_a_refusal_its_request(
    fake: Callable[..., tuple[FakeKernel, XfrmSocket]],
) -> None:
    def answer(req: m.NetlinkMessage) -> list[bytes]:
        if req.type == XfrmMsg.GETSA:
            return [m.encode_nlmsg(XfrmMsg.NEWSA, 0, req.seq, kernel_sa_v4_payload()), ack(req)]
        return [ack(req, errno.ENOENT if req.type == XfrmMsg.DELPOLICY else 0)]

    _, xs = fake(answer)
    out = await xs.call_each([m.new_policy(policy_v4()), m.get_sa(sa_v4().id()), m.delete_policy(policy_v4().id()),
                              m.new_sa(sa_v4())])  # fmt: skip
    assert out[0] == [] and out[3] == []
    assert not isinstance(out[1], XfrmError) and m.decode_sa(out[1][0].payload).sa == sa_v4()
    assert isinstance(out[2], XfrmError) and out[2].errno == errno.ENOENT


async def test_dump_multipart_and_interrupted_restart(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    calls = []

    def answer(req: m.NetlinkMessage) -> list[bytes]:
        calls.append(req)
        intr = NlmFlag.DUMP_INTR if len(calls) == 1 else 0
        part = m.encode_nlmsg(XfrmMsg.NEWSA, NlmFlag.MULTI | intr, req.seq, kernel_sa_v4_payload())
        done = m.encode_nlmsg(NlmsgType.DONE, NlmFlag.MULTI, req.seq, struct.pack("=i", 0))
        return [part, part, part, done]

    _, xs = fake(answer)
    sas = await xs.list_sas()
    assert len(sas) == 3 and len(calls) == 2  # the interrupted first dump was thrown away and restarted
    counters = await xs.sa_counters()  # the same dump, read for the counters only
    assert counters == [m.SaCounters.of(info) for info in sas] and len(calls) == 3


async def test_dump_failure_in_done(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    _, xs = fake(lambda req: [m.encode_nlmsg(NlmsgType.DONE, NlmFlag.MULTI, req.seq, struct.pack("=i", -errno.EPERM))])
    with pytest.raises(XfrmError, match=r"GETPOLICY dump failed: Operation not permitted \(EPERM\)"):
        await xs.list_policies()


async def test_silent_kernel_times_out(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    _, xs = fake(lambda req: [], reply_timeout=0.2)
    with pytest.raises(XfrmError, match=r"DELPOLICY policy 10.1.0.0/24 -> 10.2.0.0/24 dir out failed: .*ETIMEDOUT"):
        await xs.delete_policy(policy_v4().id())


async def test_loop_stays_responsive_during_a_request(fake: Callable[..., tuple[FakeKernel, XfrmSocket]]) -> None:
    """A socket's first SA (the kernel may load its crypto) and batches run in a worker thread."""
    gate = threading.Event()

    def answer(req: m.NetlinkMessage) -> list[bytes]:
        gate.wait(2)
        return [ack(req)]

    _, xs = fake(answer)
    for work in (xs.add_sa(sa_v4()), xs.delete_sas([sa_v4().id()] * 10)):
        gate.clear()
        request = asyncio.ensure_future(work)
        ticks = 0
        while ticks < 5:  # the loop runs while the kernel "works"
            await asyncio.sleep(0.01)
            ticks += 1
        assert not request.done()
        gate.set()
        await request


async def test_a_few_cheap_requests_run_on_the_loop_and_never_wait_for_a_worker(
    fake: Callable[..., tuple[FakeKernel, XfrmSocket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SPI, a policy, an SA once one went in: no worker-thread hop (0.7-0.9 ms each in UML). A worker thread that
    is talking to the kernel on the socket is never waited for on the loop: the request goes to a thread too."""
    gate, arrived = threading.Event(), threading.Event()
    gate.set()

    def answer(req: m.NetlinkMessage) -> list[bytes]:
        arrived.set()
        gate.wait(2)
        return [ack(req)]

    _, xs = fake(answer)
    hops: list[str] = []
    real = asyncio.to_thread

    async def counted(fn: Callable[..., object], *args: object) -> object:
        hops.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    await xs.add_policy(policy_v4())
    await xs.delete_sa(sa_v4().id())
    assert hops == []
    await xs.add_sa(sa_v4())  # the first SA: in a thread
    await xs.add_sa(sa_v4(), update=True)  # then inline
    assert hops == ["_exchange"]
    gate.clear()
    arrived.clear()
    busy = asyncio.ensure_future(xs.delete_sas([sa_v4().id()] * 10))  # a batch: a worker holds the socket
    assert await asyncio.get_running_loop().run_in_executor(None, arrived.wait, 2)
    small = asyncio.ensure_future(xs.delete_policy(policy_v4().id()))
    await asyncio.sleep(0.05)  # the loop is not blocked: the small request waits in a thread
    assert hops.count("_exchange") == 3 and not small.done()
    gate.set()
    await asyncio.gather(busy, small)


async def test_events_decoded_in_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    events = XfrmEvents(ours)
    expire = kernel_sa_v4_payload()[:224] + bytes([1]) + bytes(7)
    theirs.send(
        m.encode_nlmsg(XfrmMsg.EXPIRE, 0, 0, expire)
        + m.encode_nlmsg(XfrmMsg.NEWPOLICY, 0, 0, m.encode_policy(policy_v4()))
    )
    first = await asyncio.wait_for(events.next(), 2)
    second = await asyncio.wait_for(events.next(), 2)
    assert isinstance(first, m.Expire) and first.hard and first.sa.sa.spi == 0x1001
    assert isinstance(second, m.PolicyEvent) and second.policy.policy.direction == PolicyDir.OUT
    events.close()
    theirs.close()
    assert EventsLost() == EventsLost()


async def test_events_already_sent_are_read_without_waiting_beside_a_waiting_reader() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    events = XfrmEvents(ours)
    waiting = asyncio.ensure_future(events.next())  # the watcher, parked on the socket
    await asyncio.sleep(0)
    assert events.ready_now() == []  # nothing sent: no wait, nothing made up
    policy = m.encode_nlmsg(XfrmMsg.NEWPOLICY, 0, 0, m.encode_policy(policy_v4()))
    theirs.send(policy + policy)
    theirs.send(policy)
    ready = events.ready_now()  # both datagrams, in order, before the loop has run the waiting reader
    assert [type(e) for e in ready] == [m.PolicyEvent] * 3
    theirs.send(policy)  # the waiting reader still gets what comes next
    assert isinstance(await asyncio.wait_for(waiting, 2), m.PolicyEvent)
    events.close()
    theirs.close()


async def test_events_keep_the_socket_registered_and_stop_reading_when_nobody_takes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    for name in ("add_reader", "remove_reader"):
        real = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    monkeypatch.setattr("ipsec_bridge.xfrm.netlink._BACKLOG", 3)
    events = XfrmEvents(ours)
    policy = m.encode_nlmsg(XfrmMsg.NEWPOLICY, 0, 0, m.encode_policy(policy_v4()))
    for _ in range(5):  # one event at a time, each awaited: registered once, not once per event
        theirs.send(policy)
        assert isinstance(await asyncio.wait_for(events.next(), 2), m.PolicyEvent)
    assert calls == ["add_reader"]
    theirs.send(policy + policy + policy + policy)  # four at once while nobody waits: read and kept
    for _ in range(3):
        theirs.send(policy)
    for _ in range(10):
        await asyncio.sleep(0)
    # one datagram (4 events) read, over the backlog of 3: reading paused, the rest wait in the kernel
    assert calls == ["add_reader", "remove_reader"]
    # reading resumes once those are taken, and takes the other 3 datagrams in one go (the backlog again)
    got = [await asyncio.wait_for(events.next(), 2) for _ in range(7)]
    assert [type(e) for e in got] == [m.PolicyEvent] * 7
    assert calls == ["add_reader", "remove_reader", "add_reader", "remove_reader"]
    theirs.send(policy)
    assert isinstance(await asyncio.wait_for(events.next(), 2), m.PolicyEvent)
    events.close()
    assert calls == ["add_reader", "remove_reader", "add_reader", "remove_reader", "add_reader", "remove_reader"]
    theirs.close()


def test_unknown_netns_is_a_clear_error() -> None:
    with pytest.raises(XfrmError, match=r"enter network namespace 'no-such-ns' \(/run/netns/no-such-ns\) failed"):
        open_socket("no-such-ns")


def test_batch_error_text_without_more() -> None:
    err = XfrmBatchError([(0, XfrmError("DELSA esp spi 0x00000001 dst 10.0.0.1", errno.ESRCH))], 1)
    assert str(err) == "DELSA esp spi 0x00000001 dst 10.0.0.1 (request 1 of 1) failed: No such process (ESRCH)"
    assert m.SaId(ip_address("10.0.0.1"), 1).describe() == "esp spi 0x00000001 dst 10.0.0.1"
