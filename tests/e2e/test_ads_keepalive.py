"""Keepalive as istiod: an idle ztunnel-style client that pings every 15 s keeps its stream.

ztunnel pings every 30 s on a connection whose stream sees no pushes for a while. With grpcio's server defaults
(pings without data at most every 5 minutes, two strikes) ztd answered the third such ping with GOAWAY
"Too many pings" and dropped every ztunnel about every two minutes. istiod accepts client pings down to half of
its keepalive interval (30 s) even without calls, and pings idle clients itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ztunnel
from tests.helpers import running_ztd

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"
IDLE = 100  # seconds: six client pings at 15 s; grpcio's defaults dropped the stream at the third (~45 s)


def test_the_servers_accept_pings_at_half_the_interval_and_ping_idle_clients() -> None:
    from xds_server.main import ZtdConfig

    options = dict(ZtdConfig(config_dir=EXAMPLES).grpc_options())
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (30_000, 10_000)
    assert "grpc.max_connection_age_ms" not in options  # off unless asked, like istiod's flag
    aged = dict(ZtdConfig(config_dir=EXAMPLES, keepalive_max_server_connection_age=1800).grpc_options())
    assert (aged["grpc.max_connection_age_ms"], aged["grpc.max_connection_age_grace_ms"]) == (1_800_000, 10_000)


async def test_an_idle_client_pinging_every_15s_keeps_its_stream_and_still_gets_changes(tmp_path: Path) -> None:
    config_dir = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config_dir)
    client_keepalive = [
        ("grpc.keepalive_time_ms", 15_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with running_ztd(tmp_path, config_dir=config_dir) as ztd:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ztd.cfg.xds_port}", options=client_keepalive)
        async with channel, ztunnel(channel) as client:
            await client.next(ADDRESS)
            await client.next(AUTHORIZATION)
            idle = await client.quiet(IDLE)  # nothing to push, nothing sent: only pings on the connection
            assert idle == [] and client.error is None, client.error
            assert client.open
            # and it is alive: a change made now reaches it at once
            shop = config_dir / "20-shop.yaml"
            shop.write_text(shop.read_text().replace("labels: {app: frontend, version: v1}",
                                                     "labels: {app: frontend, version: v2}", 1))  # fmt: skip
            got = await client.next(ADDRESS, within=5)
            assert [r.name for r in got.response.resources] == ["Kubernetes//Pod/shop/frontend-1"]
