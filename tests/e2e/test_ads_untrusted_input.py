"""What a client sends cannot flood ztd's log or pin megabytes in memory.

Before: 50 NACKs of 1 MB on the plaintext port wrote 52 MB of log in 0.24 s, and a 1 MB node id was logged in
full when its stream connected and again when it closed.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ztunnel, ztunnel_node
from tests.helpers import running_ztd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"
MEGABYTE = 1 << 20
LINE_LIMIT = 4096  # "no log line longer than a few KiB from anything a client sends"


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_megabyte_node_id_and_fifty_megabyte_nacks_leave_short_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config_dir)
    caplog.set_level(logging.DEBUG)
    node = ztunnel_node()
    node.id = node.id + "x" * MEGABYTE  # the domain part: still a ztunnel node id
    reason = "r" * MEGABYTE + "\nforged: a second log line"
    options = [("grpc.max_send_message_length", 8 * MEGABYTE)]
    async with running_ztd(tmp_path, config_dir=config_dir) as ztd:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ztd.cfg.xds_port}", options=options)
        async with channel, ztunnel(channel, node=node) as client:
            first = await client.next(ADDRESS)
            await client.next(AUTHORIZATION)
            for _ in range(50):
                client.send(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=ADDRESS, response_nonce=first.response.nonce,
                    error_detail=status_pb2.Status(code=3, message=reason),
                ))  # fmt: skip
            await client.quiet(1.0)
            (stream,) = ztd.ztd.xds_streams.streams()
            kept = stream.statuses()[ADDRESS].last_error
            rendered = ztd.ztd.metrics.render()
        await client.wait_closed()

    lines = [r.getMessage() for r in caplog.records]
    assert max(len(line) for line in lines) < LINE_LIMIT, max(len(line) for line in lines)
    assert not any(line.startswith("forged") for m in lines for line in m.splitlines()[1:])  # one line each
    nack_lines = [line for line in lines if "NACK from" in line]
    assert len(nack_lines) == 1, nack_lines  # the other 49 are counted, not logged
    assert "…(+" in nack_lines[0] and "\\x0aforged" not in nack_lines[0]  # clipped before the newline
    assert metric(rendered, 'pilot_total_xds_rejects{type="wds"}') == 50
    assert metric(rendered, 'ztd_xds_suppressed_logs{type="wds"}') == 49
    # what the stream keeps for syncz / proxy-status is bounded too
    assert len(kept) < 1200 and kept.startswith("rrrr") and kept.endswith("chars)")
    # the node id: clipped in the stream id and in every line that names the stream
    assert len(stream.id) < 200
    connect = [line for line in lines if "connected from" in line]
    assert connect and all(len(line) < 400 for line in connect)


async def test_an_unserved_type_of_a_megabyte_is_refused_with_a_short_status(tmp_path: Path) -> None:
    config_dir = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config_dir)
    async with running_ztd(tmp_path, config_dir=config_dir) as ztd:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ztd.cfg.xds_port}")
        # The unserved type alone: with a served type first, the client's ACK of its response could race the
        # server's refusal, and grpc's Python client then reports its own failed write (INTERNAL) instead.
        async with channel, ztunnel(channel, types=("type.googleapis.com/" + "y" * MEGABYTE,)) as client:
            error = await client.wait_closed()
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details() or "") < 700 and "is not served by ztd" in (error.details() or "")
