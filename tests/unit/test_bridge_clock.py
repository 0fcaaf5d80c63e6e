"""The tunnels' one injected monotonic clock: the state store's stamps and every tunnel room read the clock they
are given (here a hand-moved one, far from time.monotonic()), so ages, gaps, backoff and removal latencies all
follow it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from ipsec_bridge.handshake import Kind, Preamble
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.local_source import LocalConfigSource
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import SaManager, SaSettings
from ipsec_bridge.state import StateStore
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.records import Generation
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.xfrm.offload import OffloadStatus
from tests.support.bridge_fakes import MESH, NoCertificates, RecordingXfrm, block_policy_dump
from tests.support.bridge_mesh import settings, write_mesh
from ztcore.mesh.translate import TranslateOptions
from ztcore.metrics import Registry

WALL = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
A1, B1 = "10.1.0.10", "10.2.0.10"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def generation(established_mono: float) -> Generation:
    return Generation(1, 0x7A000001, 0xA001, 0xB001, 16, OffloadStatus.NONE, WALL, established_mono, WALL, 0.01)


async def manager_at(
    tmp_path: Path, clock: Clock, bridge: BridgeSettings | None = None
) -> tuple[TunnelManager, StateStore]:
    store = StateStore(settings(), monotonic=clock)
    await LocalConfigSource(write_mesh(tmp_path), store, TranslateOptions()).load_initial()
    sa = SaManager(cast(Any, RecordingXfrm([], block_policy_dump())), SaSettings(mesh_cidrs=MESH))
    await sa.start(TunnelScope.POD)
    manager = TunnelManager(bridge or BridgeSettings(node="node-a"), store, sa, cast(Any, NoCertificates()),
                            cast(Any, None), BridgeMetrics(Registry()), monotonic=clock, wall=lambda: WALL)  # fmt: skip
    await manager.reconcile(store.view)
    return manager, store


async def test_the_store_and_reconcile_stamp_with_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock(5000.0)
    manager, store = await manager_at(tmp_path, clock)
    assert store.view.received_at == 5000.0
    assert manager.tunnels and {t.created for t in manager.tunnels.values()} == {5000.0}


async def test_ages_gaps_and_backoff_follow_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock(5000.0)
    manager, _ = await manager_at(tmp_path, clock)
    t = manager.tunnels[("pod", A1, B1)]
    assert t.spec.initiator
    t.current = generation(established_mono=5000.0)
    request = Preamble(Kind.REKEY_REQUEST, KeyScope.POD, B1, A1)

    clock.now = 5000.5  # inside min_rekey_gap (2 s) of the generation
    assert manager.responder.on_rekey_request(request) == "rekeyed 0.5s ago"
    clock.now = 5001.0  # the previous request was 0.5 s ago
    assert manager.responder.on_rekey_request(request) == "a rekey was requested less than 1s ago"
    clock.now = 5003.0
    assert manager.responder.on_rekey_request(request) is None and t.rekey_reason == "peer request"

    clock.now = 5010.0
    (row,) = [r for r in (await manager.dump())["tunnels"] if r["key"] == f"pod/{A1}/{B1}"]
    assert row["age_seconds"] == 10.0

    manager.generations.failed(t, "initiator", TimeoutError("slow peer"))
    assert 5010.4 <= t.next_attempt <= 5010.5  # retry_initial 0.5 s, jittered down by at most 20 %


async def test_removal_latency_is_measured_on_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock(5000.0)
    manager, _ = await manager_at(tmp_path, clock)
    t = manager.tunnels[("pod", A1, B1)]
    t.current = generation(established_mono=5000.0)
    clock.now = 5000.25
    await manager.remove(t, "policy or workload change", since=5000.0)
    assert list(manager.removals) == [{"tunnel": f"pod/{A1}/{B1}", "reason": "policy or workload change",
                                       "seconds": 0.25}]  # fmt: skip
    assert ("pod", A1, B1) not in manager.tunnels


class QuietWriter:
    """The responder's side of a connection: what it writes, and a peer address."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str) -> object:
        return ("192.168.50.2", 40000) if name == "peername" else None


async def test_a_peer_asking_twice_at_once_is_answered_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # eager set-up at 2,000 pairs: node-b asked twice within a second for 18 tunnels, and each second request
    # was a WARNING on node-a; it is refused (the first stands) and logged at debug only
    clock = Clock(5000.0)
    manager, _ = await manager_at(tmp_path, clock, BridgeSettings(node="node-a", check_source_address=False))
    request = Preamble(Kind.REKEY_REQUEST, KeyScope.POD, B1, A1)
    assert manager.responder.on_rekey_request(request) is None  # the first request
    reader = asyncio.StreamReader()
    reader.feed_data(request.encode())
    reader.feed_eof()
    writer = QuietWriter()
    with caplog.at_level(logging.DEBUG):
        await manager.responder.serve_connection(reader, cast(Any, writer))
    assert writer.data  # it was answered (a refusal)
    assert [r.levelname for r in caplog.records if "less than 1s" in r.getMessage()] == ["DEBUG"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
