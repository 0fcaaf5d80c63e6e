"""What the ztunnel-style ADS tests share: the example mesh folder they serve, and the debug `syncz` query over xDS.

Used by tests/e2e/test_ads_ztunnel.py, tests/e2e/test_ads_server.py and tests/e2e/test_ads_cli.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2

from tests.e2e.ads_client import sotw_exchange
from ztcore.xds import typeurls

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"


async def syncz_over_xds(ch: grpc.aio.Channel, metadata: Any = ()) -> list[csds_pb2.ClientConfig]:
    call, queue = await sotw_exchange(ch, [discovery_pb2.DiscoveryRequest(type_url=typeurls.DEBUG_SYNCZ)], metadata)
    resp = await asyncio.wait_for(call.read(), 5)
    queue.put_nowait(None)
    call.cancel()
    assert resp.control_plane.identifier.startswith("{")
    out = []
    for res in resp.resources:
        cc = csds_pb2.ClientConfig()
        assert res.Unpack(cc)
        out.append(cc)
    return out
