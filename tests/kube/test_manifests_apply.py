"""manifests/ against a real kube-apiserver: accepted as written, and the RBAC is what ztd needs, no more.

The files are server-side applied (a dry run first, then for real, then again to show they are stable), the
pod templates go through the API server's own admission (Pod Security), a real ztd runs with a token of the
`ztd` ServiceAccount and does all its Kubernetes work (list, watch, TokenReview, root ConfigMaps), and
SubjectAccessReviews plus a few attempted calls show what `ztd` and `zt-bridge` cannot do.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sds.ca.kubesecret import SECRET_NAMES
from sds.ca.rootconfigmap import ROOT_CONFIGMAP
from tests.helpers import running_ztd
from tests.kube.conftest import wait_registry
from tests.support.kube import SA_ISSUER, KubeApi, KubeCluster, RestResponse, rest, token_kubeconfig
from tests.support.kube_ca import create_certificate, holds, identity, read_root, uri_sans
from tests.support.wait import eventually
from xds_server.registry.kube import KINDS
from ztcore.lease import LEASE_NAME

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
FIELD_MANAGER = "ztdpu-manifests"
NS = "istio-system"


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file, object) in apply order: the namespace, the CRDs, then the numbered files."""
    files = sorted(MANIFESTS.glob("*.yaml"))
    ordered = files[:1] + sorted((MANIFESTS / "crds").glob("*.yaml")) + files[1:]
    for path in ordered:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


DOCS = list(documents())


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


class Applier:
    """Server-side apply of any object, its URL found through the API server's discovery."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self._resources: dict[str, dict[str, tuple[str, bool]]] = {}

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        if api_version not in self._resources:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            listing = rest(self.cluster, "GET", base)
            assert listing.status == 200, listing
            self._resources[api_version] = {
                r["kind"]: (r["name"], r["namespaced"]) for r in listing.body["resources"] if "/" not in r["name"]
            }
        return self._resources[api_version][kind]

    def path(self, doc: dict[str, Any]) -> str:
        api_version = doc["apiVersion"]
        plural, namespaced = self._resource(api_version, doc["kind"])
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        meta = doc["metadata"]
        where = f"/namespaces/{meta['namespace']}" if namespaced else ""
        return f"{base}{where}/{plural}/{meta['name']}"

    def apply(self, doc: dict[str, Any], *, dry_run: bool) -> RestResponse:
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        return rest(
            self.cluster, "PATCH", self.path(doc), doc, content_type="application/apply-patch+yaml", query=query
        )


def sa_user(name: str) -> tuple[str, list[str]]:
    return f"system:serviceaccount:{NS}:{name}", [
        "system:serviceaccounts",
        f"system:serviceaccounts:{NS}",
        "system:authenticated",
    ]


@dataclasses.dataclass(frozen=True)
class Access:
    verb: str
    resource: str
    namespace: str = ""
    name: str = ""
    group: str = ""
    subresource: str = ""

    def attributes(self) -> dict[str, str]:
        attrs = {"verb": self.verb, "resource": self.resource, "group": self.group}
        for key in ("namespace", "name", "subresource"):
            if getattr(self, key):
                attrs[key] = getattr(self, key)
        return attrs


def review(cluster: KubeCluster, account: str, access: Access) -> bool:
    user, groups = sa_user(account)
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": access.attributes()},
    }
    out = rest(cluster, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
    assert out.status == 201, out
    return bool(out.body["status"].get("allowed"))


# What ztd does (today, or with the Lease/CA Secret code): every one must be allowed.
ZTD_NEEDS = [
    *(
        Access(verb, spec.plural, group=spec.api_versions[0].rpartition("/")[0])
        for spec in KINDS
        for verb in ("list", "watch")
    ),
    Access("list", "authorizationpolicies", "shop", group="security.istio.io"),
    Access("create", "tokenreviews", group="authentication.k8s.io"),
    Access("list", "configmaps", name=ROOT_CONFIGMAP),
    Access("create", "configmaps", "shop"),
    Access("patch", "configmaps", "shop", ROOT_CONFIGMAP),
    Access("patch", "configmaps", "kube-system", ROOT_CONFIGMAP),
    *(Access(v, "secrets", NS, n) for v in ("get", "list", "watch") for n in SECRET_NAMES),
    Access("create", "secrets", NS),
    Access("update", "secrets", NS, "istio-ca-secret"),  # self-signed root rotation by the Lease holder
    *(Access(v, "leases", NS, LEASE_NAME, group="coordination.k8s.io") for v in ("get", "update")),
    Access("create", "leases", NS, group="coordination.k8s.io"),
]

# What it must not be able to do.
ZTD_MUST_NOT = [
    Access("create", "pods", "shop"),
    Access("delete", "pods", "shop", "web-1"),
    Access("get", "pods", "shop", "web-1"),  # the registry lists and watches; it never reads one object
    Access("create", "pods", subresource="exec", namespace="shop", name="web-1"),
    Access("get", "secrets", "kube-system", "cacerts"),
    Access("get", "secrets", "shop", "db-password"),
    Access("get", "secrets", NS, "other"),
    Access("list", "secrets", NS),
    Access("list", "secrets"),
    Access("delete", "secrets", NS, "cacerts"),
    Access("patch", "secrets", NS, "cacerts"),
    Access("update", "secrets", NS, "cacerts"),  # the plug-in CA is the operator's, never rewritten
    Access("list", "leases", NS, group="coordination.k8s.io"),
    Access("delete", "leases", NS, LEASE_NAME, group="coordination.k8s.io"),
    Access("list", "configmaps"),
    Access("list", "configmaps", "shop"),
    Access("get", "configmaps", "shop", "app-settings"),
    Access("patch", "configmaps", "shop", "app-settings"),
    Access("update", "configmaps", "shop", ROOT_CONFIGMAP),
    Access("delete", "configmaps", "shop", ROOT_CONFIGMAP),
    Access("create", "secrets", "shop"),
    Access("update", "leases", NS, "other", group="coordination.k8s.io"),
    Access("create", "leases", "shop", group="coordination.k8s.io"),
    Access("create", "serviceaccounts", "shop", "web", subresource="token"),
    Access("create", "clusterrolebindings", group="rbac.authorization.k8s.io"),
    Access("update", "nodes", name="node-a"),
    Access("get", "nodes", name="node-a", subresource="proxy"),
    Access("create", "authorizationpolicies", "shop", group="security.istio.io"),
    Access("delete", "services", "shop", "web"),
    Access("impersonate", "users"),
    Access("create", "subjectaccessreviews", group="authorization.k8s.io"),
]


@pytest.fixture(scope="module")
def applied(kube_cluster: KubeCluster, kube: KubeApi) -> dict[str, RestResponse]:
    """Every manifest, dry-run then applied for real; the answers by file and object."""
    applier = Applier(kube_cluster)
    answers: dict[str, RestResponse] = {}
    for dry_run in (True, False):
        for file, doc in DOCS:
            out = applier.apply(doc, dry_run=dry_run)
            key = f"{file}: {doc['kind']}/{doc['metadata']['name']}{' (dry run)' if dry_run else ''}"
            answers[key] = out
    return answers


def test_every_manifest_is_accepted_without_warnings(applied: dict[str, RestResponse]) -> None:
    assert len(applied) == 2 * len(DOCS)
    for key, out in applied.items():
        assert out.status in (200, 201), f"{key}: HTTP {out.status} {out.body.get('message', '')}"
        assert out.warnings == (), f"{key}: {out.warnings}"


def test_applied_objects_are_stored_as_written_and_a_second_apply_changes_nothing(
    kube_cluster: KubeCluster, applied: dict[str, RestResponse]
) -> None:
    applier = Applier(kube_cluster)
    before = {}
    for _, doc in DOCS:
        got = rest(kube_cluster, "GET", applier.path(doc))
        assert got.status == 200, (doc["kind"], doc["metadata"]["name"])
        before[applier.path(doc)] = got.body["metadata"]["resourceVersion"]
    dep = rest(kube_cluster, "GET", applier.path(find("Deployment", "ztd"))).body
    assert dep["spec"]["replicas"] == 2
    ds = rest(kube_cluster, "GET", applier.path(find("DaemonSet", "zt-bridge"))).body
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]} and sc["privileged"] is False
    for _, doc in DOCS:
        out = applier.apply(doc, dry_run=False)
        assert out.status == 200 and out.body["metadata"]["resourceVersion"] == before[applier.path(doc)], (
            f"{doc['kind']}/{doc['metadata']['name']} changed on a second apply"
        )


def _pod(workload: dict[str, Any], namespace: str) -> dict[str, Any]:
    template = workload["spec"]["template"]
    name = workload["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-check", "namespace": namespace,
            "labels": template["metadata"]["labels"]}, "spec": template["spec"]}  # fmt: skip


def _dry_run_pod(cluster: KubeCluster, pod: dict[str, Any]) -> RestResponse:
    path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods"
    return rest(cluster, "POST", path, pod, query={"dryRun": "All"})


async def test_pod_templates_pass_admission_and_meet_their_pod_security_level(
    kube_cluster: KubeCluster, kube: KubeApi, applied: dict[str, RestResponse]
) -> None:
    ztd, bridge = find("Deployment", "ztd"), find("DaemonSet", "zt-bridge")
    for level in ("restricted", "baseline"):
        await kube.namespace(f"psa-{level}", {"pod-security.kubernetes.io/enforce": level})
        for account in ("ztd", "zt-bridge"):
            await kube.service_account(f"psa-{level}", account)
    # In istio-system (enforce: privileged, from 00-namespace.yaml) both pods are admitted.
    for workload in (ztd, bridge):
        out = await asyncio.to_thread(_dry_run_pod, kube_cluster, _pod(workload, NS))
        assert out.status == 201, out.body.get("message")
        assert out.warnings == ()
    # ztd meets the strictest level; the bridge's host network and NET_ADMIN need "privileged".
    out = await asyncio.to_thread(_dry_run_pod, kube_cluster, _pod(ztd, "psa-restricted"))
    assert out.status == 201 and out.warnings == (), (out.body.get("message"), out.warnings)
    out = await asyncio.to_thread(_dry_run_pod, kube_cluster, _pod(bridge, "psa-baseline"))
    assert out.status == 403
    message = out.body["message"]
    assert "hostNetwork" in message and "NET_ADMIN" in message, message
    # The same violations under a warn-only label come back as Warning headers: the "no warnings"
    # assertions above listen on a channel that works.
    await kube.namespace("psa-warn", {"pod-security.kubernetes.io/warn": "baseline"})
    await kube.service_account("psa-warn", "zt-bridge")
    out = await asyncio.to_thread(_dry_run_pod, kube_cluster, _pod(bridge, "psa-warn"))
    assert out.status == 201 and any("hostNetwork" in w for w in out.warnings), out.warnings


async def test_ztd_runs_with_its_own_account(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str, applied: dict[str, RestResponse],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A real ztd under the `ztd` ServiceAccount: everything it does with the API is allowed by the RBAC."""
    token = await kube.token(NS, "ztd", audience=SA_ISSUER, seconds=3600)
    kubeconfig = token_kubeconfig(kube_cluster, tmp_path / "ztd.kubeconfig", token)
    # A wrong root ConfigMap that ztd must patch, and a pod and account to authenticate with.
    await kube.call(
        kube.core.create_namespaced_config_map,
        ns,
        {"metadata": {"name": ROOT_CONFIGMAP}, "data": {"root-cert.pem": "stale"}},
    )
    await kube.service_account(ns, "frontend")
    uid = await kube.pod(ns, "frontend-1", service_account="frontend", node="node-a", ip="10.244.1.10")
    caplog.set_level(logging.INFO)
    async with running_ztd(tmp_path, kubeconfig=str(kubeconfig)) as running:
        source: Any = running.ztd._source
        # Started: the first list of every kind went through (ztd does not start without them).
        stats = source.stats()
        assert {kind for kind, s in stats.items() if s.lists >= 1 and s.errors == 0} == {s.kind for s in KINDS}
        assert stats["AuthorizationPolicy"].api_version == "security.istio.io/v1"
        # Watches: a pod created now reaches the registry.
        await kube.pod(ns, "frontend-2", service_account="frontend", node="node-b", ip="10.244.2.10")
        assert running.ztd.registry is not None
        await wait_registry(running.ztd.registry, lambda snap: snap.get_pod(ns, "frontend-2") is not None)
        # TokenReview: a pod's istio-ca token gets a certificate.
        pod_token = await kube.token(ns, "frontend", audience="istio-ca", pod="frontend-1", uid=uid)
        chain = await create_certificate(running, pod_token)
        assert uri_sans(chain[0]) == [identity(ns, "frontend")]
        # Root ConfigMaps: the stale one patched, a new namespace's created.
        root = running.root_pem.decode()
        await kube.namespace(f"{ns}-new")
        for namespace in (ns, f"{ns}-new", NS):
            await eventually(lambda n=namespace: _holds(kube, n, root), within=15)  # type: ignore[misc]
        # Leadership and the shared CA: this replica holds the Lease, and signs with the root of a Secret.
        lease = await asyncio.to_thread(
            rest, kube_cluster, "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE_NAME}"
        )
        assert lease.body["spec"]["holderIdentity"] == running.cfg.identity
        roots = []
        for name in SECRET_NAMES:
            secret = await asyncio.to_thread(rest, kube_cluster, "GET", f"/api/v1/namespaces/{NS}/secrets/{name}")
            if secret.status == 200:
                roots.append(base64.b64decode(secret.body["data"]["root-cert.pem"]).decode())
        assert root in roots[0], "ztd signs with a CA that is not the first Secret of cacerts, istio-ca-secret"
        # The probe the kubelet would send.
        url = f"http://127.0.0.1:{running.cfg.monitoring_port}/ready"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
        assert all(s.errors == 0 for s in source.stats().values()), source.stats()
    refused = [r.getMessage() for r in caplog.records if "forbidden" in r.getMessage().lower()]
    assert refused == []


async def _holds(kube: KubeApi, namespace: str, root: str) -> bool:
    return holds(await read_root(kube, namespace), root)


def test_ztd_may_do_what_it_needs(kube_cluster: KubeCluster, applied: dict[str, RestResponse]) -> None:
    denied = [a for a in ZTD_NEEDS if not review(kube_cluster, "ztd", a)]
    assert denied == []


def test_ztd_may_not_do_anything_else(kube_cluster: KubeCluster, applied: dict[str, RestResponse]) -> None:
    allowed = [a for a in ZTD_MUST_NOT if review(kube_cluster, "ztd", a)]
    assert allowed == []


def test_zt_bridge_may_do_nothing(kube_cluster: KubeCluster, applied: dict[str, RestResponse]) -> None:
    allowed = [a for a in ZTD_NEEDS + ZTD_MUST_NOT if review(kube_cluster, "zt-bridge", a)]
    assert allowed == []


async def test_refused_calls_are_refused_for_real(
    kube_cluster: KubeCluster, kube: KubeApi, ns: str, applied: dict[str, RestResponse]
) -> None:
    """The reviews agree with the API server's answers to real calls made with each account's token."""
    await kube.service_account(ns, "web")
    await kube.pod(ns, "web-1", service_account="web", node="node-a")
    ztd = await kube.token(NS, "ztd", audience=SA_ISSUER)
    bridge = await kube.token(NS, "zt-bridge", audience=SA_ISSUER)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "evil"},
           "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}}  # fmt: skip
    attempts = [
        ("DELETE", f"/api/v1/namespaces/{ns}/pods/web-1", None),
        ("POST", f"/api/v1/namespaces/{ns}/pods", pod),
        ("GET", "/api/v1/namespaces/kube-system/secrets", None),
        ("GET", f"/api/v1/namespaces/{NS}/secrets", None),
    ]
    for token in (ztd, bridge):
        for method, path, body in attempts:
            out = await asyncio.to_thread(rest, kube_cluster, method, path, body, token=token)
            assert out.status == 403, (method, path, out.status)
    # What ztd may do works with the same token; the bridge's account may not even list pods.
    allowed = await asyncio.to_thread(rest, kube_cluster, "GET", "/api/v1/pods", token=ztd)
    assert allowed.status == 200
    bridge_list = await asyncio.to_thread(rest, kube_cluster, "GET", "/api/v1/pods", token=bridge)
    assert bridge_list.status == 403
