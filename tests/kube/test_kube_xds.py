"""From the API server to a connected ztunnel-style client: a pod or policy change arrives within 1 s."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ZtunnelClient, ztunnel
from tests.helpers import RunningZtd
from tests.support.kube import KubeApi

BOUND = 1.0


def workloads(client: ZtunnelClient, ns: str) -> dict[str, Any]:
    """name -> Workload of this namespace in the client's Address store."""
    out = {}
    for _, msg in client.stores[ADDRESS].values():
        if msg.WhichOneof("type") == "workload" and msg.workload.namespace == ns:
            out[msg.workload.name] = msg.workload
    return out


def policies(client: ZtunnelClient, ns: str) -> set[str]:
    return {msg.name for _, msg in client.stores[AUTHORIZATION].values() if msg.namespace == ns}


async def until(client: ZtunnelClient, check: Any, within: float = 5.0) -> float:
    """Seconds until the client's stores satisfy check, reading its responses as they come."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(within):
        while not check():
            await client.next()
    return loop.time() - start


async def test_pod_and_policy_changes_reach_a_ztunnel_within_a_second(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    await kube.service_account(ns, "web")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ztd.cfg.xds_port}")
    async with channel, ztunnel(channel) as client:
        await client.next()
        await client.next()  # the initial Address and Authorization responses
        latencies = {}

        await kube.pod(ns, "web-1", service_account="web", node="node-a", ip="10.7.0.5")
        latencies["pod added"] = await until(client, lambda: "web-1" in workloads(client, ns))
        wl = workloads(client, ns)["web-1"]
        assert wl.uid == f"Kubernetes//Pod/{ns}/web-1" and wl.service_account == "web" and wl.node == "node-a"
        assert [bytes(a) for a in wl.addresses] == [bytes([10, 7, 0, 5])]

        body = {
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-evil"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]},
        }
        await kube.create_policy(ns, body)
        latencies["policy added"] = await until(client, lambda: "deny-evil" in policies(client, ns))

        await kube.delete_policy(ns, "AuthorizationPolicy", "deny-evil")
        latencies["policy deleted"] = await until(client, lambda: "deny-evil" not in policies(client, ns))

        await kube.delete_pod(ns, "web-1")
        latencies["pod deleted"] = await until(client, lambda: "web-1" not in workloads(client, ns))
    print("\nAPI write acknowledged -> ztunnel: " + ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in latencies.items()))
    slow = {k: round(v, 3) for k, v in latencies.items() if v >= BOUND}
    assert not slow, f"slower than {BOUND}s: {slow}"
