"""The ztd-leader Lease against a real API server: electors in-process, then two `ztd` processes with failover.

The process test is the HA story end to end: both replicas serve xDS and sign; only the Lease holder runs
the singleton duties (root ConfigMaps); SIGKILL the holder and the standby takes the Lease within the lease
duration plus a retry period and takes the duties over; a ztunnel-style client of the dead replica resumes
on the other with `initial_resource_versions` and gets only what changed meanwhile (versions are content
hashes, equal on both replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ZtunnelClient, ztunnel
from tests.helpers import free_port
from tests.support.kube import KubeApi, KubeCluster
from tests.support.kube_ca import holds, read_root
from tests.support.wait import eventually
from xds_server.registry.kube import load_api_client
from ztcore.lease import LEASE_NAME, KubeLeaseStore, LeaseConflict, LeaseElector, LeaseTiming

DURATION, RENEW, RETRY = 3.0, 2.0, 0.5
SLACK = 1.0  # API round trips and a loaded 2-core machine


async def read_lease(kube: KubeApi, ns: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return await kube.call(kube.models.CoordinationV1Api(kube.client).read_namespaced_lease, LEASE_NAME, ns)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


# --- electors in-process -----------------------------------------------------------------------------------


async def test_electors_share_one_lease_through_the_api_server(
    kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    timing = LeaseTiming(DURATION, RENEW, RETRY)
    api = await asyncio.to_thread(load_api_client, str(kube_cluster.kubeconfig))
    try:
        a, b = (LeaseElector(KubeLeaseStore(api, ns), name, timing) for name in ("ztd-a", "ztd-b"))
        # Both race from "no Lease": one create wins, the other gets a conflict.
        await asyncio.gather(a.round(), b.round())
        assert [a.is_leader, b.is_leader].count(True) == 1
        leader, standby = (a, b) if a.is_leader else (b, a)
        lease = await read_lease(kube, ns)
        spec = lease.spec
        assert spec.holder_identity == leader.identity and spec.lease_duration_seconds == DURATION
        assert spec.acquire_time is not None and spec.renew_time is not None and spec.lease_transitions == 0
        # Renewals move renewTime and the resourceVersion; the standby keeps waiting.
        await asyncio.sleep(RETRY)
        await leader.round()
        await standby.round()
        renewed = await read_lease(kube, ns)
        assert renewed.spec.renew_time > spec.renew_time and renewed.spec.acquire_time == spec.acquire_time
        assert renewed.metadata.resource_version != lease.metadata.resource_version
        assert leader.is_leader and not standby.is_leader and standby.holder == leader.identity
        # A write from a stale read is refused by the API server (optimistic concurrency).
        stale = await KubeLeaseStore(api, ns).get()
        assert stale is not None
        await leader.round()
        with pytest.raises(LeaseConflict):
            await KubeLeaseStore(api, ns).update(stale)
        # A clean shutdown clears the holder; the standby takes over at its next round, no duration wait.
        await leader.release()
        released = await read_lease(kube, ns)
        assert released.spec.holder_identity in ("", None) and not leader.is_leader
        await standby.round()
        taken = await read_lease(kube, ns)
        assert standby.is_leader and taken.spec.holder_identity == standby.identity
        assert taken.spec.lease_transitions == 1
    finally:
        api.close()


# --- two ztd processes -------------------------------------------------------------------------------------------


@dataclass
class ZtdProcess:
    name: str
    workdir: Path
    kubeconfig: Path
    namespace: str
    xds_port: int = field(default_factory=free_port)
    secure_port: int = field(default_factory=free_port)
    monitoring_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "ztd.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            str(Path(sys.executable).parent / "ztd"),
            f"--kubeconfig={self.kubeconfig}",
            f"--state-dir={self.workdir / 'state'}",
            f"--xds-port={self.xds_port}",
            f"--secure-port={self.secure_port}",
            f"--monitoring-port={self.monitoring_port}",
            f"--lease-duration={DURATION}",
            f"--lease-renew-deadline={RENEW}",
            f"--lease-retry-period={RETRY}",
        ]
        # Identity and namespace as Kubernetes' downward API hands them to istiod.
        env = {**os.environ, "POD_NAME": self.name, "POD_NAMESPACE": self.namespace}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.monitoring_port}{path}", timeout=aiohttp.ClientTimeout(total=3)) as resp,
        ):
            return resp.status, await resp.text()

    async def wait_ready(self, within: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                if (await self.get("/ready"))[0] == 200:
                    return
            await asyncio.sleep(0.2)
        pytest.fail(f"{self.name} not ready in {within}s:\n{self.tail()}")

    async def leader_gauge(self) -> float:
        _, text = await self.get("/metrics")
        (line,) = [ln for ln in text.splitlines() if ln.startswith("ztd_leader ")]
        return float(line.split()[1])

    def root(self) -> bytes:
        return (self.workdir / "state" / "root-cert.pem").read_bytes()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@contextlib.asynccontextmanager
async def replicas(tmp: Path, kubeconfig: Path, ns: str, *names: str) -> AsyncIterator[list[ZtdProcess]]:
    procs = [ZtdProcess(n, tmp / n, kubeconfig, ns) for n in names]
    try:
        for p in procs:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in procs))
        yield procs
    except BaseException:
        for p in procs:  # the replicas' own account of what happened, next to the failure
            print(f"--- {p.name} log ---\n{p.tail()}")
        raise
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


def plaintext(p: ZtdProcess) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{p.xds_port}")


async def synced(client: ZtunnelClient, name: str, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while name not in client.stores[ADDRESS]:
            await client.next(within=within)


async def test_failover_between_two_ztd_processes(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    await kube.service_account(ns, "web")
    await kube.pod(ns, "web-1", service_account="web", node="node-a", ip="10.7.1.5")
    web1, web2 = f"Kubernetes//Pod/{ns}/web-1", f"Kubernetes//Pod/{ns}/web-2"
    async with replicas(tmp_path, kube_cluster.kubeconfig, ns, "ztd-a", "ztd-b") as (a, b):
        # Started together in an empty namespace: one root, created once.
        assert a.root() == b.root()
        root = a.root().decode()
        lease = await read_lease(kube, ns)
        by_name = {"ztd-a": a, "ztd-b": b}
        holder = by_name[lease.spec.holder_identity]
        standby = b if holder is a else a
        assert (await holder.leader_gauge(), await standby.leader_gauge()) == (1.0, 0.0)
        status, text = await standby.get("/debug/leader")
        assert status == 200 and f'"holder": "{holder.name}"' in text and '"leader": false' in text
        # The holder's duty: the root ConfigMap (in every namespace; this test watches its own).
        await eventually(lambda: _root_is(kube, ns, root), within=10)

        # A ztunnel on each replica: the same resources with the same (content-hash) versions.
        async with plaintext(holder) as ch1, ztunnel(ch1) as on_holder, plaintext(standby) as ch2:
            async with ztunnel(ch2) as on_standby:
                await synced(on_holder, web1)
                await synced(on_standby, web1)
                held = on_holder.versions()
                assert held == on_standby.versions()
                assert held[ADDRESS][web1]

            # The holder dies without a goodbye.
            transitions = lease.spec.lease_transitions or 0
            killed_at = time.monotonic()
            holder.stop(signal.SIGKILL)
            error = await on_holder.wait_closed(10)
            # The stream breaks, not ends: grpcio says UNAVAILABLE, or INTERNAL when the loss
            # is first seen by the client's own ACK write (a race seen in CI).
            assert error is not None, "the stream ended cleanly after SIGKILL"
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), error

        # Meanwhile: the root ConfigMap is deleted, and a pod is added.
        await kube.call(kube.core.delete_namespaced_config_map, "istio-ca-root-cert", ns)
        await kube.pod(ns, "web-2", service_account="web", node="node-b", ip="10.7.2.5")
        # No duty runs without a holder: the ConfigMap stays gone until the standby has taken the Lease.
        while (lease := await read_lease(kube, ns)).spec.holder_identity != standby.name:
            assert await read_root(kube, ns) is None, "ConfigMap recreated before the takeover"
            assert time.monotonic() - killed_at < DURATION + RETRY + SLACK + 2, "no takeover"
            await asyncio.sleep(0.05)
        took = time.monotonic() - killed_at
        print(f"\nSIGKILL -> Lease taken over by {standby.name} in {took:.2f}s (duration {DURATION}s, retry {RETRY}s)")
        assert took <= DURATION + RETRY + SLACK
        assert lease.spec.lease_transitions == transitions + 1
        assert await standby.leader_gauge() == 1.0
        await eventually(lambda: _root_is(kube, ns, root), within=5)

        # The ztunnel reconnects to the survivor with what it holds: only the change comes back.
        sent: dict[str, set[str]] = {ADDRESS: set(), AUTHORIZATION: set()}
        async with plaintext(standby) as ch, ztunnel(ch, initial=held) as again:
            async with asyncio.timeout(10):
                while web2 not in again.stores[ADDRESS]:
                    resp = (await again.next(within=10)).response
                    sent[resp.type_url].update(r.name for r in resp.resources)
                    assert not resp.removed_resources
            assert sent == {ADDRESS: {web2}, AUTHORIZATION: set()}
            assert not [r for r in await again.quiet(0.5) if r.response.resources or r.response.removed_resources]
            assert web1 not in again.stores[ADDRESS]  # held, unchanged: not resent

        # A clean stop releases the Lease at once.
        assert await asyncio.to_thread(standby.stop) == 0
        released = await read_lease(kube, ns)
        assert released.spec.holder_identity in ("", None)


async def _root_is(kube: KubeApi, ns: str, root: str) -> bool:
    return holds(await read_root(kube, ns), root)
