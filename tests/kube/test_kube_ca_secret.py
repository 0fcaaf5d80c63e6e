"""The CA from Kubernetes Secrets, against a real API server: `cacerts` when present, else `istio-ca-secret`
created once by the Lease holder, watched and swapped live.

Each test gives ztd its own namespace (`--namespace`), so its Secrets and Lease are its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sds.ca import keyring, signer
from sds.ca.keyring import CAError, key_pem
from sds.ca.kubesecret import CA_SECRET, CA_SECRET_TYPE, CACERTS_SECRET, ca_secret_body, material_from_secret
from tests.cacerts import make_cacerts
from tests.helpers import RunningZtd, bearer, make_csr, new_key, request, running_ztd
from tests.support.kube import KubeApi, KubeCluster
from tests.support.wait import eventually
from ztcore.lease import LEASE_NAME

FAST_LEASE = {"lease_duration": 3.0, "lease_renew_deadline": 2.0, "lease_retry_period": 0.3}


def ztd_config(kube_cluster: KubeCluster, namespace: str, pod: str, **extra: Any) -> dict[str, Any]:
    return {"kubeconfig": str(kube_cluster.kubeconfig), "namespace": namespace, "pod_name": pod, **FAST_LEASE, **extra}


def secret_data(folder: Path, names: dict[str, str] | None = None) -> dict[str, str]:
    """A cacerts folder as Secret data; `names` maps file name -> Secret key (for the tls.* layout)."""
    mapping = names or {n: n for n in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")}
    return {key: base64.b64encode((folder / name).read_bytes()).decode() for name, key in mapping.items()}


async def put_cacerts(kube: KubeApi, ns: str, data: dict[str, str]) -> None:
    body = kube.models.V1Secret(metadata=kube.models.V1ObjectMeta(name=CACERTS_SECRET), data=data)
    try:
        await kube.call(kube.core.create_namespaced_secret, ns, body)
    except Exception:
        await kube.call(kube.core.replace_namespaced_secret, CACERTS_SECRET, ns, body)


async def read_secret(kube: KubeApi, ns: str, name: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return await kube.call(kube.core.read_namespaced_secret, name, ns)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


async def issue(ztd: RunningZtd, root_pem: bytes) -> list[x509.Certificate]:
    """A workload certificate through the secure port, trusting `root_pem`."""
    ztd.root_pem = root_pem
    async with ztd.secure_channel() as ch:
        resp = await ztd.ca(ch).CreateCertificate(
            request(make_csr(new_key())), metadata=bearer(ztd.token("default/app"))
        )
    return [x509.load_pem_x509_certificate(c.encode()) for c in resp.cert_chain]


def chains_to(chain: list[x509.Certificate], root: x509.Certificate) -> None:
    for child, parent in itertools.pairwise(chain):
        child.verify_directly_issued_by(parent)
    assert chain[-1] == root
    root.verify_directly_issued_by(root)


@contextlib.asynccontextmanager
async def ztd_in(tmp: Path, **cfg: Any) -> AsyncIterator[RunningZtd]:
    async with running_ztd(tmp, **cfg) as running:
        yield running


async def test_cacerts_secret_is_used(tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str) -> None:
    root, inter = make_cacerts(tmp_path / "plug")
    await put_cacerts(kube, ns, secret_data(tmp_path / "plug"))
    async with ztd_in(tmp_path / "z", **ztd_config(kube_cluster, ns, "ztd-0")) as ztd:
        assert ztd.root_pem == (tmp_path / "plug" / "root-cert.pem").read_bytes()
        chain = await issue(ztd, ztd.root_pem)
        chains_to(chain, root)
        assert chain[1] == inter
        assert ztd.ztd.kube_ca is not None and ztd.ztd.kube_ca.active == CACERTS_SECRET
    # A plugged-in CA means no self-signed root was made.
    assert await read_secret(kube, ns, CA_SECRET) is None


async def test_tls_secret_layout_is_accepted(tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str) -> None:
    root, _ = make_cacerts(tmp_path / "plug")
    names = {"cert-chain.pem": "tls.crt", "ca-key.pem": "tls.key", "root-cert.pem": "ca.crt"}
    await put_cacerts(kube, ns, secret_data(tmp_path / "plug", names))
    async with ztd_in(tmp_path / "z", **ztd_config(kube_cluster, ns, "ztd-0")) as ztd:
        chains_to(await issue(ztd, ztd.root_pem), root)


async def test_without_cacerts_the_holder_creates_istio_ca_secret_once(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    async with ztd_in(tmp_path / "a", **ztd_config(kube_cluster, ns, "ztd-0")) as ztd:
        secret = await read_secret(kube, ns, CA_SECRET)
        assert secret is not None and secret.type == CA_SECRET_TYPE
        assert set(secret.data) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
        assert base64.b64decode(secret.data["root-cert.pem"]) == ztd.root_pem
        assert base64.b64decode(secret.data["ca-cert.pem"]) == ztd.root_pem  # self-signed: signs with the root
        root = x509.load_pem_x509_certificate(ztd.root_pem)
        chains_to(await issue(ztd, ztd.root_pem), root)
        assert ztd.ztd.kube_ca is not None and ztd.ztd.kube_ca.created
        created_rv = secret.metadata.resource_version
    # A restart (fresh state folder) loads the same root; the Secret is not written again.
    async with ztd_in(tmp_path / "b", **ztd_config(kube_cluster, ns, "ztd-1")) as again:
        assert again.root_pem == ztd.root_pem
        assert again.ztd.kube_ca is not None and not again.ztd.kube_ca.created
    secret = await read_secret(kube, ns, CA_SECRET)
    assert secret.metadata.resource_version == created_rv


async def test_two_replicas_started_together_share_one_root(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            stack.enter_async_context(ztd_in(tmp_path / "a", **ztd_config(kube_cluster, ns, "ztd-a"))),
            stack.enter_async_context(ztd_in(tmp_path / "b", **ztd_config(kube_cluster, ns, "ztd-b"))),
        )
        assert a.root_pem == b.root_pem
        assert a.ztd.kube_ca is not None and b.ztd.kube_ca is not None
        assert [a.ztd.kube_ca.created, b.ztd.kube_ca.created].count(True) == 1
        secret = await read_secret(kube, ns, CA_SECRET)
        assert base64.b64decode(secret.data["root-cert.pem"]) == a.root_pem
        # Exactly one of them holds the Lease, and it is the one that created the root.
        lease = await kube.call(kube.models.CoordinationV1Api(kube.client).read_namespaced_lease, LEASE_NAME, ns)
        creator = "ztd-a" if a.ztd.kube_ca.created else "ztd-b"
        assert lease.spec.holder_identity == creator
        assert a.ztd.elector is not None and b.ztd.elector is not None
        assert [a.ztd.elector.is_leader, b.ztd.elector.is_leader].count(True) == 1
        # Both sign, with the same root.
        root = x509.load_pem_x509_certificate(a.root_pem)
        chains_to(await issue(a, a.root_pem), root)
        chains_to(await issue(b, b.root_pem), root)


async def test_a_changed_cacerts_secret_is_picked_up_live(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    async with ztd_in(tmp_path / "z", **ztd_config(kube_cluster, ns, "ztd-0")) as ztd:
        self_signed = ztd.root_pem
        kube_ca = ztd.ztd.kube_ca
        assert kube_ca is not None and kube_ca.active == CA_SECRET
        # A plug-in CA arrives: signing switches to it, and the published root follows.
        root1, _ = make_cacerts(tmp_path / "one")
        await put_cacerts(kube, ns, secret_data(tmp_path / "one"))
        root1_pem = (tmp_path / "one" / "root-cert.pem").read_bytes()
        await eventually(lambda: _published(ztd, root1_pem), within=5)
        chains_to(await issue(ztd, root1_pem), root1)
        # The plug-in CA is rotated (a new root): swapped again, and the secure port's serving cert too.
        root2, inter2 = make_cacerts(tmp_path / "two")
        await put_cacerts(kube, ns, secret_data(tmp_path / "two"))
        root2_pem = (tmp_path / "two" / "root-cert.pem").read_bytes()
        await eventually(lambda: _published(ztd, root2_pem), within=5)
        chain = await issue(ztd, root2_pem)  # the TLS handshake trusts only root2 now
        chains_to(chain, root2)
        assert chain[1] == inter2 and kube_ca.swaps == 2
        # A broken update (key of another CA) is refused: still root2, and the key never shows up in logs.
        bad = secret_data(tmp_path / "two")
        bad["ca-key.pem"] = secret_data(tmp_path / "one")["ca-key.pem"]
        await put_cacerts(kube, ns, bad)
        await eventually(lambda: kube_ca.refusals == 1, within=5, what="the broken update seen and refused")
        chains_to(await issue(ztd, root2_pem), root2)
        assert kube_ca.swaps == 2
        # The root ConfigMap in every namespace follows the swap (this replica is the Lease holder).
        await eventually(lambda: _root_configmap_is(kube, ns, root2_pem), within=5)
    assert self_signed != root2_pem


async def _published(ztd: RunningZtd, root_pem: bytes) -> bool:
    return await asyncio.to_thread(ztd.cfg.published_root.read_bytes) == root_pem


async def _root_configmap_is(kube: KubeApi, ns: str, root_pem: bytes) -> bool:
    cm = await kube.call(kube.core.read_namespaced_config_map, "istio-ca-root-cert", ns)
    return bool((cm.data or {}).get("root-cert.pem") == root_pem.decode())


async def test_leader_restores_a_deleted_istio_ca_secret(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    async with ztd_in(tmp_path / "z", **ztd_config(kube_cluster, ns, "ztd-0")) as ztd:
        await kube.call(kube.core.delete_namespaced_secret, CA_SECRET, ns)

        async def restored() -> bool:
            secret = await read_secret(kube, ns, CA_SECRET)
            return secret is not None and base64.b64decode(secret.data["root-cert.pem"]) == ztd.root_pem

        await eventually(restored, within=5)


async def test_a_standby_without_a_root_gives_up_with_one_line(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    # Another replica holds the Lease (and never creates the root).
    coordination = kube.models.CoordinationV1Api(kube.client)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease = {
        "metadata": {"name": LEASE_NAME},
        "spec": {"holderIdentity": "ztd-elsewhere", "leaseDurationSeconds": 3600, "renewTime": now},
    }
    await kube.call(coordination.create_namespaced_lease, ns, lease)
    with pytest.raises(BaseException) as err:  # a CAError, maybe inside an ExceptionGroup: unwrapped below
        async with ztd_in(tmp_path / "z", **ztd_config(kube_cluster, ns, "ztd-0", ca_secret_wait=1.5)):
            pass
    found = err.value
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    assert isinstance(found, CAError)
    message = str(found)
    assert "\n" not in message
    assert f"{ns}/{CA_SECRET}" in message and "holder: ztd-elsewhere" in message, message


def test_secret_validation_names_keys_never_content(tmp_path: Path) -> None:
    """Secret data goes through keyring's loader: same rules, errors name the Secret key."""
    make_cacerts(tmp_path)
    data = secret_data(tmp_path)
    secret = {"metadata": {"name": CACERTS_SECRET, "namespace": "istio-system"}, "data": data}
    now = dt.datetime.now(dt.UTC)
    assert material_from_secret(secret, now).source == "Secret istio-system/cacerts"
    broken = {**secret, "data": {**data, "ca-key.pem": base64.b64encode(b"not a key").decode()}}
    with pytest.raises(CAError, match=r"^CA key Secret istio-system/cacerts key ca-key.pem is not an unencrypted"):
        material_from_secret(broken, now)
    other = key_pem(new_key())
    mismatched = {**secret, "data": {**data, "ca-key.pem": base64.b64encode(other).decode()}}
    with pytest.raises(CAError, match="does not match") as err:
        material_from_secret(mismatched, now)
    assert "PRIVATE" not in str(err.value) and base64.b64encode(other).decode()[:20] not in str(err.value)
    with pytest.raises(CAError, match=r"key ca-cert\.pem is not base64"):
        material_from_secret({**secret, "data": {**data, "ca-cert.pem": "%%%"}}, now)


async def test_leader_rotates_an_expiring_self_signed_root_with_the_same_key(
    tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    # A root with 5 of its 62 minutes left: under Istio's default 20 % grace, so due for rotation.
    now = dt.datetime.now(dt.UTC)
    old = keyring.create_self_signed(
        "ecdsa-p256", "cluster.local", dt.timedelta(hours=1), now - dt.timedelta(minutes=55)
    )
    await kube.call(kube.core.create_namespaced_secret, ns, ca_secret_body(old, ns))
    old_leaf = x509.load_pem_x509_certificate(
        signer.sign(new_key().public_key(), ["spiffe://cluster.local/ns/a/sa/b"], dt.timedelta(minutes=3), old, now)[
            0
        ].encode()
    )
    cfg = ztd_config(kube_cluster, ns, "ztd-0", self_signed_root_check_interval=0.2)
    async with ztd_in(tmp_path / "z", **cfg) as ztd:

        async def rotated() -> bool:
            secret = await read_secret(kube, ns, CA_SECRET)
            return bool(base64.b64decode(secret.data["root-cert.pem"]) != keyring.pem(old.signing_cert).encode())

        await eventually(rotated, within=10)
        secret = await read_secret(kube, ns, CA_SECRET)
        new_root = x509.load_pem_x509_certificate(base64.b64decode(secret.data["root-cert.pem"]))
        assert new_root.subject == old.signing_cert.subject
        assert new_root.public_key() == old.signing_cert.public_key()
        assert new_root.not_valid_after_utc > now + dt.timedelta(days=3000)
        # Issued before the rotation, still valid under the new root: no re-issue needed at the switch.
        old_leaf.verify_directly_issued_by(new_root)
        new_pem = keyring.pem(new_root).encode()
        await eventually(lambda: _published(ztd, new_pem), within=5)
        chains_to(await issue(ztd, new_pem), new_root)
        # Once: the new root is far from its grace period (two more passes over it rotate nothing).
        kube_ca = ztd.ztd.kube_ca
        assert kube_ca is not None
        checked = kube_ca.rotation_checks
        await eventually(lambda: kube_ca.rotation_checks >= checked + 2, within=5, what="two more rotation checks")
        assert kube_ca.rotations == 1
        assert (await read_secret(kube, ns, CA_SECRET)).metadata.resource_version == secret.metadata.resource_version
