"""The xDS metrics users of istiod look for, on ztd's /metrics, moved by a real client and a real change."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import aiohttp
import grpc

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ztunnel
from tests.helpers import running_ztd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, name
    return float(found.group(1))


async def test_a_change_is_counted_as_a_push_and_a_convergence(tmp_path: Path) -> None:
    config_dir = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config_dir)
    async with running_ztd(tmp_path, config_dir=config_dir) as ztd:
        url = f"http://127.0.0.1:{ztd.cfg.monitoring_port}/metrics"
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ztd.cfg.xds_port}")
        async with channel, ztunnel(channel) as client, aiohttp.ClientSession() as http:
            await client.next(ADDRESS)
            await client.next(AUTHORIZATION)
            async with http.get(url) as resp:
                before = await resp.text()
            shop = config_dir / "20-shop.yaml"
            shop.write_text(shop.read_text().replace("labels: {app: frontend, version: v1}",
                                                     "labels: {app: frontend, version: v2}", 1))  # fmt: skip
            await client.next(ADDRESS, within=5)
            async with http.get(url) as resp:
                after = await resp.text()
    assert sample(before, "pilot_xds") == 1  # one client connected
    assert sample(before, 'pilot_xds_pushes{type="wds"}') == 1 and sample(after, 'pilot_xds_pushes{type="wds"}') == 2
    assert sample(before, "pilot_proxy_convergence_time_count") == 0  # the initial sync is no config change
    assert sample(after, "pilot_proxy_convergence_time_count") == 1
    # from the file write's detection to the client: the folder poll is not in it, the debounce is
    assert 0.1 <= sample(after, "pilot_proxy_convergence_time_sum") < 5
    assert sample(after, "pilot_xds_push_time_count") == sample(before, "pilot_xds_push_time_count") + 1
