"""The CA in Kubernetes mode: TokenReview against a real API server, node authorization from its pods."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from sds.ca.tokenreview import KubeTokenReviewer
from tests.helpers import RunningZtd, bearer, make_csr, new_key, request
from tests.kube.conftest import wait_registry
from tests.support.kube import KubeApi, KubeCluster
from tests.support.kube_ca import create_certificate, identity, uri_sans
from xds_server.registry.kube import load_api_client
from ztcore.authn import caller_from_review

AUTHN_FAILURE = "request authenticate failure"
IMPERSONATION_FAILURE = "request impersonation authentication failure"


async def refused(ztd: RunningZtd, token: str, **metadata: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_certificate(ztd, token, **metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    return err.value.details() or ""


async def workload(kube: KubeApi, ns: str, sa: str, pod: str, node: str = "node-a", ip: str = "") -> str:
    await kube.service_account(ns, sa)
    return await kube.pod(ns, pod, service_account=sa, node=node, ip=ip)


async def test_pod_bound_token_gets_certificate(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    uid = await workload(kube, ns, "frontend", "frontend-1", ip="10.244.1.10")
    token = await kube.token(ns, "frontend", audience="istio-ca", pod="frontend-1", uid=uid)
    chain = await create_certificate(ztd, token)
    assert uri_sans(chain[0]) == [identity(ns, "frontend")]
    assert chain[-1].encode() == ztd.root_pem


async def test_reviewer_reads_pod_and_node_from_the_review(kube_cluster: KubeCluster, kube: KubeApi, ns: str) -> None:
    uid = await workload(kube, ns, "frontend", "frontend-1")
    token = await kube.token(ns, "frontend", audience="istio-ca", pod="frontend-1", uid=uid)
    api = await asyncio.to_thread(load_api_client, str(kube_cluster.kubeconfig))
    try:
        status = await KubeTokenReviewer(api).review(token, ["istio-ca"])
        caller = caller_from_review(status, "cluster.local", None)
        other = await KubeTokenReviewer(api).review(token, ["vault"])
    finally:
        api.close()
    assert status.authenticated and status.audiences == ("istio-ca",)
    assert status.username == f"system:serviceaccount:{ns}:frontend"
    # The extra fields bind the caller to its pod and node: what node authorization reads.
    assert (caller.pod_name, caller.pod_uid, caller.node_name) == ("frontend-1", uid, "node-a")
    assert caller.identities == (identity(ns, "frontend"),)
    assert not other.authenticated and other.error


async def test_unbound_token_gets_certificate(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    await kube.service_account(ns, "batch")
    token = await kube.token(ns, "batch", audience="istio-ca")
    chain = await create_certificate(ztd, token)
    assert uri_sans(chain[0]) == [identity(ns, "batch")]


async def test_token_of_another_audience_is_refused(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    uid = await workload(kube, ns, "frontend", "frontend-1")
    token = await kube.token(ns, "frontend", audience="vault", pod="frontend-1", uid=uid)
    assert await refused(ztd, token) == AUTHN_FAILURE
    # The API server's default audience is not ours either.
    default = await kube.token(ns, "frontend", audience="https://kubernetes.default.svc.cluster.local")
    assert await refused(ztd, default) == AUTHN_FAILURE


async def test_deleted_pods_token_is_refused(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    uid = await workload(kube, ns, "frontend", "gone-1")
    token = await kube.token(ns, "frontend", audience="istio-ca", pod="gone-1", uid=uid)
    await kube.delete_pod(ns, "gone-1")
    assert await refused(ztd, token) == AUTHN_FAILURE
    # Recreated under the same name, the pod has a new uid: the old pod's token stays dead.
    await kube.pod(ns, "gone-1", service_account="frontend", node="node-a")
    assert await refused(ztd, token) == AUTHN_FAILURE


async def test_a_token_used_before_its_pod_was_deleted_is_refused_once_the_pod_is_gone(
    ztd: RunningZtd, kube: KubeApi, ns: str
) -> None:
    uid = await workload(kube, ns, "frontend", "used-1")
    token = await kube.token(ns, "frontend", audience="istio-ca", pod="used-1", uid=uid)
    assert ztd.ztd.registry is not None
    await wait_registry(ztd.ztd.registry, lambda s: s.pod(ns, "used-1") is not None)
    assert uri_sans((await create_certificate(ztd, token))[0]) == [identity(ns, "frontend")]  # review now cached
    await kube.delete_pod(ns, "used-1")
    await wait_registry(ztd.ztd.registry, lambda s: s.pod(ns, "used-1") is None, within=1.0)
    # The cached review does not outlive the pod: no 5-minute window for a stolen token of a deleted pod.
    assert await refused(ztd, token) == AUTHN_FAILURE


async def test_garbage_and_expired_tokens_are_refused(ztd: RunningZtd) -> None:
    assert await refused(ztd, "not-a-jwt") == AUTHN_FAILURE
    # A token for a cluster we do not serve is refused before any TokenReview.
    async with ztd.secure_channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ztd.ca(ch).CreateCertificate(
                request(make_csr(new_key())), metadata=[*bearer("x.y.z"), ("clusterid", "other-cluster")]
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_ztunnel_impersonates_only_pods_on_its_node(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    zt_pod = f"ztunnel-{ns}"
    zt_uid = await kube.pod("istio-system", zt_pod, service_account="ztunnel", node="node-a", ip="192.0.2.1")
    await workload(kube, ns, "frontend", "frontend-1", node="node-a", ip="10.244.1.11")
    await workload(kube, ns, "cart", "cart-1", node="node-b", ip="10.244.2.11")
    assert ztd.ztd.registry is not None
    await wait_registry(
        ztd.ztd.registry,
        lambda s: s.pod(ns, "cart-1") is not None and s.pod("istio-system", zt_pod) is not None,
    )
    token = await kube.token("istio-system", "ztunnel", audience="istio-ca", pod=zt_pod, uid=zt_uid)

    chain = await create_certificate(ztd, token, ImpersonatedIdentity=identity(ns, "frontend"))
    assert uri_sans(chain[0]) == [identity(ns, "frontend")]
    # cart runs on node-b only; a pod's token cannot reach across nodes.
    assert await refused(ztd, token, ImpersonatedIdentity=identity(ns, "cart")) == IMPERSONATION_FAILURE

    # Only trusted node accounts impersonate: frontend's own token may not.
    fe_uid = (await kube.call(kube.core.read_namespaced_pod, "frontend-1", ns)).metadata.uid
    fe_token = await kube.token(ns, "frontend", audience="istio-ca", pod="frontend-1", uid=fe_uid)
    assert await refused(ztd, fe_token, ImpersonatedIdentity=identity(ns, "cart")) == IMPERSONATION_FAILURE

    # Moving cart's only pod away from node-b and onto node-a flips the answer, through the watch.
    await kube.delete_pod(ns, "cart-1")
    await kube.pod(ns, "cart-2", service_account="cart", node="node-a", ip="10.244.1.12")
    await wait_registry(ztd.ztd.registry, lambda s: s.count_pods_on_node(ns, "cart", "node-a") == 1)
    chain = await create_certificate(ztd, token, ImpersonatedIdentity=identity(ns, "cart"))
    assert uri_sans(chain[0]) == [identity(ns, "cart")]
