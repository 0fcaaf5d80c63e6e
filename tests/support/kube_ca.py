"""What the Kubernetes-mode tests check ztd's CA with: asking for a certificate with a token, reading the
identities in what it issued, and reading the istio-ca-root-cert ConfigMap it publishes in each namespace.

Shared by tests/kube/test_kube_ca.py, test_kube_root.py, test_kube_lease.py and test_manifests_apply.py.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509

from sds.ca.rootconfigmap import ROOT_CONFIGMAP
from tests.helpers import RunningZtd, bearer, make_csr, new_key, request
from tests.support.kube import KubeApi


def identity(ns: str, sa: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


def uri_sans(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


async def create_certificate(ztd: RunningZtd, token: str, **metadata: Any) -> list[str]:
    async with ztd.secure_channel() as ch:
        resp = await ztd.ca(ch).CreateCertificate(request(make_csr(new_key()), **metadata), metadata=bearer(token))
    return list(resp.cert_chain)


async def read_root(kube: KubeApi, ns: str) -> Any:
    """The namespace's root ConfigMap, or None when there is none."""
    from kubernetes.client.exceptions import ApiException

    try:
        return await kube.call(kube.core.read_namespaced_config_map, ROOT_CONFIGMAP, ns)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def holds(cm: Any, root: str) -> bool:
    """The ConfigMap carries `root` under root-cert.pem and the istio.io/config=true label, as istiod writes it."""
    return (
        cm is not None
        and (cm.data or {}).get("root-cert.pem") == root
        and cm.metadata.labels.get("istio.io/config") == "true"
    )
