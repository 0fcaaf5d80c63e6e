"""The bridge at scale: a slow pair-policy install does not count against the handshake deadline, a rekey only
switches the out policies, and retired generations of many tunnels go in one netlink batch.

Two real TunnelManagers (node-a initiates, node-b responds) run the real handshake over TCP with real SVIDs from
an in-process ztd; the kernel is a stand-in that answers netlink requests in order (the host has no XFRM), and
takes its time over policies, as UML did for a node tunnel's 30,000 of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

import pytest

from ipsec_bridge.certs import Certificates
from ipsec_bridge.netns import Netns
from ipsec_bridge.sa_manager import Coalescer, SaManager, SaSettings, host_net
from ipsec_bridge.state import StateStore
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.records import Generation, Tunnel
from ipsec_bridge.tunnels.responder import source_refusal
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import PolicyDir, XfrmMsg
from ipsec_bridge.xfrm.netlink import XfrmError
from ipsec_bridge.xfrm.offload import OffloadStatus
from tests.helpers import running_ztd
from tests.support.bridge_fakes import NoCertificates
from tests.support.bridge_mesh import load_view, write_mesh
from tests.support.xfrm_samples import sa_v4
from ztcore.identity import Identity
from ztcore.identity.caclient import CAClient, CAClientOptions
from ztcore.identity.manager import RotationPolicy, SecretManager
from ztcore.metrics import Registry

BRIDGE = Identity("cluster.local", "istio-system", "ztunnel")
A1, B1 = "10.1.0.10", "10.2.0.10"  # pod a1 on node-a, b1 on node-b: node-a initiates their tunnel
POLICY_TYPES = (XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY)


class SlowKernel:
    """Answers XFRM requests like the kernel (ALLOCSPI hands out fresh SPIs, writes are acked); each batch that
    holds policies takes `policy_delay` seconds. Records every batch, and can refuse chosen DELSA SPIs."""

    def __init__(self, policy_delay: float = 0.0) -> None:
        self.policy_delay = policy_delay
        self.batches: list[list[m.Request]] = []
        self.refuse_spis: set[int] = set()
        self._spis = itertools.count(0x2000)

    def runs_inline(self, requests: Sequence[m.Request]) -> bool:
        return not (self.policy_delay and any(r.type in POLICY_TYPES for r in requests))  # no sleep: no suspension

    async def call_each(self, requests: Sequence[m.Request]) -> list[list[m.NetlinkMessage] | XfrmError]:
        self.batches.append(list(requests))
        if self.policy_delay and any(r.type in POLICY_TYPES for r in requests):
            await asyncio.sleep(self.policy_delay)
        out: list[list[m.NetlinkMessage] | XfrmError] = []
        for r in requests:
            if r.type == XfrmMsg.ALLOCSPI:
                sa = dataclasses.replace(sa_v4(), spi=next(self._spis))
                out.append([m.NetlinkMessage(XfrmMsg.NEWSA, 0, 0, 0, m.encode_sa(sa))])
            elif r.type == XfrmMsg.DELSA and m.decode_sa_id(r.payload).spi in self.refuse_spis:
                out.append(XfrmError("DELSA", errno.EPERM))
            else:
                out.append([])
        return out

    async def add_policies(self, policies: Sequence[m.Policy], *, update: bool = False) -> None:
        pass  # the local pods' bypass policies (reconcile)

    def requests(self, *types: XfrmMsg) -> list[m.Request]:
        return [r for batch in self.batches for r in batch if r.type in types]

    def policies(self) -> list[m.Policy]:
        return [m.decode_policy(r.payload).policy for r in self.requests(*POLICY_TYPES)]


class LoopbackNetns(Netns):
    """Both bridges run on this host: the peer node's address is this test's listening port."""

    def __init__(self, port: int) -> None:
        super().__init__(None)
        self.port = port

    async def connect(
        self, host: str, port: int, connect_s: float, source: str | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@dataclass
class Node:
    manager: TunnelManager
    kernel: SlowKernel


@dataclass
class Pair:
    a: Node
    b: Node
    store: StateStore


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """node-a and node-b bridges in pod scope: a 1 s handshake deadline, 1.5 s per policy batch."""
    store = await load_view(write_mesh(tmp_path / "mesh"))
    async with running_ztd(tmp_path, config_dir=write_mesh(tmp_path / "ztd")) as rz, contextlib.AsyncExitStack() as st:
        nodes: dict[str, Node] = {}
        for node in ("node-a", "node-b"):
            token = tmp_path / f"{node}.token"
            token.write_text(rz.token("istio-system/ztunnel", node=node))
            options = CAClientOptions(
                address=f"127.0.0.1:{rz.cfg.secure_port}", root_cert=rz.cfg.published_root, token_file=token
            )
            ca = CAClient(options)
            st.push_async_callback(ca.close)
            secrets = SecretManager(ca, RotationPolicy(), credential_identity=BRIDGE)
            task = asyncio.create_task(secrets.run())
            st.callback(task.cancel)
            kernel = SlowKernel(policy_delay=1.5)
            sa = SaManager(cast(Any, kernel), SaSettings(mesh_cidrs=store.settings.mesh_cidrs))
            # the policy deadline: 1 s + 1 s per policy (3 per pod pair), the exchange keeps its 1 s
            # both bridges connect from 127.0.0.1, not from their nodes' WDS addresses: source checks off here
            settings = BridgeSettings(
                node=node, handshake_timeout=1.0, grace=0.5, policy_seconds_each=1.0, check_source_address=False
            )
            manager = TunnelManager(
                settings, store, sa, Certificates(secrets), LoopbackNetns(0), BridgeMetrics(Registry())
            )
            await manager.reconcile(store.view)
            for t in manager.tunnels.values():  # SVIDs issued ahead, as a running bridge has them
                await manager.certs.credential(t.spec.local_identity, 10)
            nodes[node] = Node(manager, kernel)
        server = await asyncio.start_server(nodes["node-b"].manager.serve_connection, "127.0.0.1", 0)
        st.push_async_callback(server.wait_closed)
        st.callback(server.close)
        cast(LoopbackNetns, nodes["node-a"].manager.netns).port = server.sockets[0].getsockname()[1]
        yield Pair(nodes["node-a"], nodes["node-b"], store)


async def test_a_slow_policy_install_does_not_time_the_handshake_out(pair: Pair) -> None:
    key = ("pod", A1, B1)
    ta = pair.a.manager.tunnels[key]
    assert ta.spec.initiator
    started = time.monotonic()
    await pair.a.manager.initiator.initiate(ta)
    took = time.monotonic() - started
    tb = pair.b.manager.tunnels[("pod", B1, A1)]
    # each side spent 1.5 s on its policies, beyond the 1 s deadline of the exchange: still up on both sides
    assert ta.last_error == "" and tb.last_error == "", (ta.last_error, tb.last_error)
    assert ta.current is not None and tb.current is not None and took >= 1.5
    assert (ta.current.spi_in, ta.current.spi_out) == (tb.current.spi_out, tb.current.spi_in)
    assert ta.current.handshake_seconds >= 1.5  # the metric still covers the policies
    for node, t in ((pair.a, ta), (pair.b, tb)):
        sas = node.kernel.requests(XfrmMsg.NEWSA, XfrmMsg.UPDSA)
        assert len(sas) == 2
        # SAs first (the inbound one, under the SPI its side chose, before the outbound one), the policies after both
        kinds = [r.type for batch in node.kernel.batches for r in batch if r.type != XfrmMsg.ALLOCSPI]
        assert kinds[:2] == [XfrmMsg.NEWSA, XfrmMsg.NEWSA] and set(kinds[2:]) <= set(POLICY_TYPES)
        assert t.current is not None and m.decode_sa(sas[0].payload).sa.spi == t.current.spi_in
        pols = node.kernel.policies()
        assert sorted(p.direction for p in pols) == sorted((PolicyDir.IN, PolicyDir.FWD, PolicyDir.OUT))
        (out,) = [p for p in pols if p.direction == PolicyDir.OUT]
        assert t.current is not None and out.templates[0].reqid == t.current.reqid

    # a rekey: only the out policies move to the new generation; in/fwd (reqid 0) are left as they are
    for node in (pair.a, pair.b):
        node.kernel.batches.clear()
    old_a = ta.current
    await pair.a.manager.initiator.initiate(ta)
    assert ta.last_error == "" and ta.current is not None and ta.current.number == 2
    assert tb.current is not None and tb.current.number == 2
    for node, t in ((pair.a, ta), (pair.b, tb)):
        (out,) = node.kernel.policies()
        assert t.current is not None and out.direction == PolicyDir.OUT and out.templates[0].reqid == t.current.reqid
    # the old generation outlives the grace period by as long as the switch took (the peer's runs alongside)
    ((retired, at),) = ta.retiring
    assert retired is old_a and at - time.monotonic() > pair.a.manager.settings.grace + 1.0


async def test_a_handshake_from_another_address_than_the_peer_nodes_is_refused(pair: Pair) -> None:
    pair.a.kernel.policy_delay = pair.b.kernel.policy_delay = 0.0
    responder = pair.b.manager.responder  # the check is the responder's; settings are fixed at construction
    responder.settings = dataclasses.replace(responder.settings, check_source_address=True)
    ta = pair.a.manager.tunnels[("pod", A1, B1)]
    await pair.a.manager.initiator.initiate(ta)
    # node-a's bridge is 192.0.2.x in WDS but this connection comes from 127.0.0.1: no tunnel, no SA on node-b
    assert ta.current is None and ta.last_error.startswith("refused"), ta.last_error
    assert "connection from 127.0.0.1" in ta.last_error
    assert pair.b.manager.tunnels[("pod", B1, A1)].current is None
    assert pair.b.kernel.requests(XfrmMsg.NEWSA, XfrmMsg.UPDSA) == []


async def test_source_refusal(pair: Pair) -> None:
    spec = pair.b.manager.tunnels[("pod", B1, A1)].spec
    assert source_refusal((str(spec.endpoints.peer_node), 40000), spec) is None
    assert source_refusal((f"::ffff:{spec.endpoints.peer_node}", 40000, 0, 0), spec) is None
    assert "connection from 10.9.9.9" in (source_refusal(("10.9.9.9", 40000), spec) or "")
    assert source_refusal(None, spec) is not None
    assert source_refusal(("not-an-address", 1), spec) is not None


async def test_the_exchange_itself_is_still_bounded_by_the_handshake_timeout(pair: Pair) -> None:
    pair.a.kernel.policy_delay = pair.b.kernel.policy_delay = 0.0
    ta = pair.a.manager.tunnels[("pod", A1, B1)]
    slow_install = pair.b.manager.sa.install

    async def stuck(*args: Any, **kwargs: Any) -> Any:  # the responder's SAs, which the initiator's done waits for
        await asyncio.sleep(5)
        return await slow_install(*args, **kwargs)

    pair.b.manager.sa.install = stuck  # type: ignore[method-assign]
    started = time.monotonic()
    await pair.a.manager.initiator.initiate(ta)
    assert ta.current is None and ta.last_error.startswith("timeout") and time.monotonic() - started < 3


def _generation(n: int, spi_in: int, spi_out: int) -> Generation:
    now = time.monotonic()
    wall = dt.datetime.now(dt.UTC)
    return Generation(n, 0x5A000000 + n, spi_in, spi_out, 16, OffloadStatus.NONE, wall, now, wall, 0.01, "adopted")


async def test_retired_generations_of_many_tunnels_go_in_one_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await load_view(write_mesh(tmp_path))
    kernel = SlowKernel()
    sa = SaManager(cast(Any, kernel), SaSettings(mesh_cidrs=store.settings.mesh_cidrs))
    manager = TunnelManager(BridgeSettings(node="node-a"), store, sa, cast(Any, NoCertificates()),
                            cast(Any, None), BridgeMetrics(Registry()))  # fmt: skip
    await manager.reconcile(store.view)
    template = manager.tunnels[("pod", A1, B1)]
    now = time.monotonic()
    tunnels = []
    for i in range(20):
        local = ip_address(f"10.1.1.{i + 1}")
        ep = dataclasses.replace(template.spec.endpoints, local_net=host_net(local))
        spec = dataclasses.replace(
            template.spec, key=("pod", str(local), B1), endpoints=ep, local_address=local, local_name=f"pod{i}"
        )
        t = Tunnel(spec, now)
        t.current = _generation(2, 0x9000 + i, 0xA000 + i)
        old = _generation(1, 0x1000 + i, 0x3000 + i)
        t.retiring = [(old, now - 0.1), (_generation(3, 0x7000 + i, 0x8000 + i), now + 60)]  # one due, one not
        sa._held.update({(ep.local_node, old.spi_in), (ep.peer_node, old.spi_out)})
        manager.tunnels[spec.key] = t
        tunnels.append(t)
    kernel.refuse_spis = {0x1005}  # one tunnel's deletion fails: the others are unaffected
    with caplog.at_level(logging.WARNING, logger="ipsec_bridge.tunnels.scheduler"):
        await manager.scheduler.retire_due(now, manager.tunnels.values())
    (batch,) = kernel.batches  # one netlink batch for all 20 tunnels
    assert len(batch) == 40 and {r.type for r in batch} == {XfrmMsg.DELSA}
    assert {m.decode_sa_id(r.payload).spi for r in batch} == {s + i for s in (0x1000, 0x3000) for i in range(20)}
    for t in tunnels:
        assert [g.number for g, _ in t.retiring] == [3]  # the due generation left, the later one stays
    warnings = [r.getMessage() for r in caplog.records if "deleting retired SAs" in r.getMessage()]
    assert len(warnings) == 1 and "pod5(10.1.1.6)" in warnings[0] and "EPERM" in warnings[0]
    # deleted adopted SAs are forgotten (their SPIs free), the failed tunnel's stay guarded
    ep5 = tunnels[5].spec.endpoints
    assert sa._held == {(ep5.local_node, 0x1005), (ep5.peer_node, 0x3005)}
    # nothing due: no request at all
    await manager.scheduler.retire_due(now, manager.tunnels.values())
    assert len(kernel.batches) == 1


async def quiet_tunnels(tmp_path: Path, count: int) -> TunnelManager:
    """A manager holding `count` established tunnels with nothing to do for an hour (its scheduler not started)."""
    store = await load_view(write_mesh(tmp_path))
    sa = SaManager(cast(Any, SlowKernel()), SaSettings(mesh_cidrs=store.settings.mesh_cidrs))
    manager = TunnelManager(BridgeSettings(node="node-a"), store, sa, cast(Any, NoCertificates()),
                            cast(Any, None), BridgeMetrics(Registry()))  # fmt: skip
    await manager.reconcile(store.view)
    template = manager.tunnels[("pod", A1, B1)]
    manager.tunnels.clear()
    now = time.monotonic()
    for i in range(count):
        local = ip_address(f"10.1.{i // 250 + 1}.{i % 250 + 1}")
        ep = dataclasses.replace(template.spec.endpoints, local_net=host_net(local))
        spec = dataclasses.replace(template.spec, key=("pod", str(local), B1), endpoints=ep, local_address=local)
        t = Tunnel(spec, now)
        t.current = dataclasses.replace(
            _generation(1, 0x9000 + i, 0xA000 + i),
            not_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
            origin="handshake",
        )
        t.next_rekey = now + 3600
        manager.tunnels[spec.key] = t
    return manager


async def test_a_commit_costs_the_scheduler_its_tunnel_not_the_table(tmp_path: Path) -> None:
    # 300 quiet tunnels: the first pass looks at each; a touched tunnel (a commit, a record, a request) is looked
    # at alone, at once; a new view (Wake.set) looks at all again; each is looked at again when its time comes
    manager = await quiet_tunnels(tmp_path, 300)
    scheduler, table = manager.scheduler, manager.table

    async def after(passes: int) -> int:
        for _ in range(1000):  # the scheduler's task runs between our sleeps
            if scheduler.passes >= passes:
                return scheduler.looks
            await asyncio.sleep(0.005)
        raise AssertionError(f"no pass {passes} within 5 s")

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(scheduler.run(tg))
        assert await after(1) == 300
        table.touch(manager.tunnels[("pod", "10.1.1.7", B1)])
        assert await after(2) == 301
        table.wake.set()
        assert await after(3) == 601
        # each one's time came: a quiet tunnel is looked at again 1 s after its last look, on the 0.25 s timer grid
        for _ in range(60):
            await asyncio.sleep(0.025)
            if scheduler.looks >= 901:
                break
        assert scheduler.looks >= 901 and scheduler.passes <= 6
        task.cancel()


async def test_tunnels_due_at_scattered_moments_share_timed_passes(tmp_path: Path) -> None:
    # 40 tunnels, each touched at its own moment over 0.4 s: 40 passes of one tunnel. A second later each one's
    # time comes at a moment of its own; the timer's 0.25 s grid gathers them into a few passes, not 40
    manager = await quiet_tunnels(tmp_path, 40)
    scheduler, table = manager.scheduler, manager.table
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(scheduler.run(tg))
        await asyncio.sleep(0.05)
        for t in list(manager.tunnels.values()):
            table.touch(t)
            await asyncio.sleep(0.01)
        touched_passes, looks = scheduler.passes, scheduler.looks
        assert looks >= 80  # the first pass (all 40) and one per touch
        await asyncio.sleep(1.6)  # every tunnel's time came once (1 s after its touch), none twice
        assert scheduler.looks - looks >= 40
        assert scheduler.passes - touched_passes <= 8, scheduler.passes - touched_passes
        task.cancel()


async def test_a_batch_on_the_loop_costs_its_caller_one_turn_and_still_gathers_what_is_scheduled() -> None:
    kernel = SlowKernel()
    batches = Coalescer(cast(Any, kernel))
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    spi = m.alloc_spi(m.SpiRequest(ip_address("192.0.2.2"), ip_address("192.0.2.1"), 0x1000, 0x1FFF))
    policy = m.delete_policy(m.PolicyId(m.Selector.of("10.1.0.1/32", "10.2.0.1/32"), PolicyDir.OUT))
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = turns
    (reply,) = await batches.submit([spi])
    assert turns - start == 1 and reply != []  # the caller sent it after one turn (a batch task took two)
    # a handler already scheduled adds its request first (as an ACQUIRE's handler adds its trap); two callers in
    # the same turn share one batch
    batches_before = len(kernel.batches)
    asyncio.get_running_loop().call_soon(batches.later, [policy])
    out = await asyncio.gather(batches.submit([spi]), batches.submit([policy]))
    assert [len(o) for o in out] == [1, 1]
    assert [[r.type for r in b] for b in kernel.batches[batches_before:]] == [
        [XfrmMsg.DELPOLICY, XfrmMsg.ALLOCSPI, XfrmMsg.DELPOLICY]
    ]
    # a batch that needs a worker thread (here: a slow kernel) goes to the batch task, and still answers everyone
    kernel.policy_delay = 0.01
    out = await asyncio.gather(batches.submit([policy]), batches.submit([spi]))
    assert [len(o) for o in out] == [1, 1] and len(kernel.batches) == batches_before + 2
    tick.cancel()


async def test_bridge_connections_read_below_the_mmap_threshold_both_ways(tmp_path: Path) -> None:
    # every connection to the peer bridge (handshake, rekey request, teardown) goes through the initiator's
    # _connect, and every one from it through serve_connection: both read 64 KiB at a time, not asyncio's 256 KiB
    from ipsec_bridge.allocator import THRESHOLD

    store = await load_view(write_mesh(tmp_path))
    sa = SaManager(cast(Any, SlowKernel()), SaSettings(mesh_cidrs=store.settings.mesh_cidrs))
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await manager.serve_connection(reader, writer)  # a preamble it cannot read: refused, closed
        accepted.set_result(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = BridgeSettings(node="node-a", port=port, handshake_timeout=2.0)
    manager = TunnelManager(settings, store, sa, cast(Any, NoCertificates()), Netns(None),
                            BridgeMetrics(Registry()))  # fmt: skip
    await manager.reconcile(store.view)
    t = manager.tunnels[("pod", A1, B1)]
    t.spec = dataclasses.replace(t.spec, endpoints=dataclasses.replace(
        t.spec.endpoints, local_node=ip_address("127.0.0.1"), peer_node=ip_address("127.0.0.1")))  # fmt: skip
    _, writer = await manager.initiator._connect(t)
    assert writer.transport.max_size < THRESHOLD  # type: ignore[attr-defined]
    writer.write(b"not a preamble" * 10)
    assert (await asyncio.wait_for(accepted, 5)).transport.max_size < THRESHOLD  # type: ignore[attr-defined]
    writer.close()
    server.close()
    await server.wait_closed()


async def test_a_tunnel_holds_its_handshake_task_only_while_it_runs(tmp_path: Path) -> None:
    # at 2,000 tunnels, finished tasks kept on their records held ~1.7 MiB (tracemalloc, in the on-demand bench)
    manager = await quiet_tunnels(tmp_path, 3)
    scheduler = manager.scheduler
    t = manager.tunnels[("pod", "10.1.1.2", B1)]
    release = asyncio.Event()
    ran: list[Tunnel] = []

    async def initiate(tunnel: Tunnel) -> None:
        ran.append(tunnel)
        await release.wait()
        tunnel.rekey_wanted = False  # as a commit does: nothing more to do for it

    manager.initiator.initiate = initiate  # type: ignore[method-assign]
    t.want_rekey("requested")
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(scheduler.run(tg))
        for _ in range(200):
            if ran:
                break
            await asyncio.sleep(0.005)
        assert ran == [t]
        running = t.task
        assert running is not None and not running.done()  # busy: the scheduler starts no second one
        looks = scheduler.looks
        release.set()
        for _ in range(200):
            if running.done() and scheduler.looks > looks:
                break
            await asyncio.sleep(0.005)
        assert running.done() and t.task is None
        assert scheduler.looks > looks  # its end touched it: looked at again (a failure's retry time)
        task.cancel()


async def test_a_policy_that_moves_the_initiator_keeps_the_tunnel_and_its_keys(pair: Pair, tmp_path: Path) -> None:
    """frontend -> ledger denied, ledger -> frontend still allowed: the pair stays admitted and node-b initiates
    now. The tunnel is not torn down and set up again (a gap in the allowed direction, and a handshake): the
    record, its generation and its SAs stay, only the role and who schedules the rekeys move. And back."""
    from tests.support.bridge_mesh import DENY_FRONTEND_TO_LEDGER, POLICIES

    pair.a.kernel.policy_delay = pair.b.kernel.policy_delay = 0.0
    a = pair.a.manager
    ta = a.tunnels[("pod", A1, B1)]
    await a.initiator.initiate(ta)
    gen = ta.current
    assert gen is not None and ta.spec.initiator and ta.next_rekey is not None
    pair.a.kernel.batches.clear()

    one_way = (await load_view(write_mesh(tmp_path / "one-way", POLICIES + DENY_FRONTEND_TO_LEDGER))).view
    await a.reconcile(one_way)
    assert a.tunnels[("pod", A1, B1)] is ta and ta.current is gen and not ta.spec.initiator
    assert ta.next_rekey is None and list(a.table.removals) == []
    touched = [r.type for batch in pair.a.kernel.batches for r in batch]
    assert not {XfrmMsg.DELSA, XfrmMsg.DELPOLICY} & set(touched), touched

    both_ways = (await load_view(write_mesh(tmp_path / "both-ways", POLICIES))).view
    await a.reconcile(both_ways)
    assert a.tunnels[("pod", A1, B1)] is ta and ta.current is gen and ta.spec.initiator
    interval = a.settings.rekey_interval
    assert (
        ta.next_rekey is not None and gen.established_mono + (1 - a.settings.rekey_jitter) * interval <= ta.next_rekey
    )
    assert ta.next_rekey <= gen.established_mono + interval and list(a.table.removals) == []


async def test_a_responder_that_thought_it_initiated_keeps_its_record_when_the_peers_handshake_comes(
    pair: Pair,
) -> None:
    """node-b's record says it initiates (a view from before a policy change), node-b's view now says node-a
    does, and node-a's handshake arrives: the record is kept (its generation's SAs with it, retired as a rekey
    retires them) instead of replaced by a new one that would leave them in the kernel."""
    from ipsec_bridge.handshake import Kind

    pair.a.kernel.policy_delay = pair.b.kernel.policy_delay = 0.0
    ta = pair.a.manager.tunnels[("pod", A1, B1)]
    await pair.a.manager.initiator.initiate(ta)
    tb = pair.b.manager.tunnels[("pod", B1, A1)]
    gen = tb.current
    assert gen is not None and not tb.spec.initiator
    tb.spec = dataclasses.replace(tb.spec, initiator=True)  # the stale role
    preamble = pair.a.manager.generations.preamble(ta.spec, Kind.HANDSHAKE)
    assert pair.b.manager.responder.tunnel_for(preamble) is tb
    assert not tb.spec.initiator and tb.current is gen and tb.next_rekey is None
    await pair.a.manager.initiator.initiate(ta)  # a rekey: node-b's old generation retires, nothing is left over
    assert tb.current is not None and tb.current.number == 2 and [g for g, _ in tb.retiring] == [gen]
