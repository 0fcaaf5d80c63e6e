"""A real etcd + kube-apiserver on loopback for tests, built by scripts/kube-tools.sh on first use.

`KubeCluster.start(workdir)` generates its PKI with `cryptography` (a CA, the serving certificate, an admin
client certificate in system:masters, the service-account signing key), starts etcd and kube-apiserver
(RBAC, service-account token signing, no controller manager and no kubelet), waits for /readyz and writes an
admin kubeconfig. `restart_apiserver()` kills and restarts the API server on the same port and etcd, for
"a restart loses no update". `compact_etcd()` drops etcd's history, and `PausableProxy` cuts a client off
from the API server while others keep writing, for "a watch that expires with 410 loses no update".

Use the session fixture from a conftest.py:  `from tests.support.kube import kube_cluster_fixture`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "kube-tools.sh"
CRDS = REPO / "manifests" / "crds"
# A cold build of both binaries takes many minutes on 2 cores; a warm cache answers at once.
BUILD_TIMEOUT = 45 * 60.0
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "ztdpu-admin"


class KubeToolsError(Exception):
    """The binaries could not be found or built, or a server did not start; one readable paragraph."""


# --- binaries -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KubeTools:
    bin_dir: Path

    @property
    def apiserver(self) -> Path:
        return self.bin_dir / "kube-apiserver"

    @property
    def etcd(self) -> Path:
        return self.bin_dir / "etcd"

    def complete(self) -> bool:
        return all(os.access(p, os.X_OK) for p in (self.apiserver, self.etcd))


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if shutil.which("bash") is None:
        raise KubeToolsError("bash is needed to run scripts/kube-tools.sh")
    try:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise KubeToolsError(f"scripts/kube-tools.sh {' '.join(args)} did not finish in {timeout:.0f}s") from None


def kube_tools(*, build: bool = True, timeout: float = BUILD_TIMEOUT) -> KubeTools:
    """Paths of the pinned kube-apiserver and etcd; builds them (blocking, minutes when cold) if missing."""
    located = _script("--bin-dir", timeout=30)
    if located.returncode != 0 or not located.stdout.strip():
        raise KubeToolsError(f"scripts/kube-tools.sh --bin-dir failed: {located.stderr.strip()}")
    tools = KubeTools(Path(located.stdout.strip()))
    if tools.complete():
        return tools
    if not build:
        raise KubeToolsError(f"kube-apiserver/etcd missing under {tools.bin_dir}; run scripts/kube-tools.sh")
    built = _script(timeout=timeout)
    if built.returncode != 0:
        raise KubeToolsError(f"scripts/kube-tools.sh failed (exit {built.returncode}):\n{built.stderr.strip()[-4000:]}")
    if not tools.complete():
        raise KubeToolsError(f"scripts/kube-tools.sh succeeded but {tools.bin_dir} is incomplete")
    return tools


# --- PKI --------------------------------------------------------------------------------------------------------


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _cert(
    subject: x509.Name,
    key: Any,
    issuer: x509.Name,
    issuer_key: Any,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def generate(cls, folder: Path) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ztdpu-test-kube-ca")])
        ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        serving_key = ec.generate_private_key(ec.SECP256R1())
        serving = _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            serving_key,
            ca_name,
            ca_key,
            sans=[
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes.default.svc"),
            ],
            usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        admin_key = ec.generate_private_key(ec.SECP256R1())
        admin = _cert(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_USER),
                ]
            ),
            admin_key,
            ca_name,
            ca_key,
            usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pki = cls(
            ca_cert=folder / "ca.crt",
            serving_cert=folder / "apiserver.crt",
            serving_key=folder / "apiserver.key",
            admin_cert=folder / "admin.crt",
            admin_key=folder / "admin.key",
            sa_key=folder / "sa.key",
            sa_pub=folder / "sa.pub",
        )
        pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        pki.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))
        _write_private(pki.serving_key, _pem_key(serving_key))
        pki.admin_cert.write_bytes(admin.public_bytes(serialization.Encoding.PEM))
        _write_private(pki.admin_key, _pem_key(admin_key))
        _write_private(pki.sa_key, _pem_key(sa_key))
        pki.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return pki


# --- processes ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class KubeCluster:
    tools: KubeTools
    workdir: Path
    pki: Pki
    etcd_port: int
    apiserver_port: int
    extra_args: tuple[str, ...] = ()
    etcd: subprocess.Popen[bytes] | None = None
    apiserver: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    startup_seconds: list[float] = field(default_factory=list)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, tools: KubeTools, workdir: Path, extra_args: tuple[str, ...] = ()) -> KubeCluster:
        cluster = cls(tools, workdir, Pki.generate(workdir / "pki"), free_port(), free_port(), extra_args)
        try:
            cluster._start_etcd()
            cluster._start_apiserver()
            cluster.write_kubeconfig(cluster.kubeconfig)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def stop(self) -> None:
        _stop(self.apiserver)
        _stop(self.etcd)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def write_kubeconfig(self, path: Path, server: str | None = None) -> Path:
        """An admin kubeconfig (client certificate in system:masters), optionally pointing at another address."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": server or self.url, "certificate-authority": str(self.pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {"client-certificate": str(self.pki.admin_cert), "client-key": str(self.pki.admin_key)},
                }
            ],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": ADMIN_USER}}],
            "current-context": "test",
        }
        _write_private(path, yaml.safe_dump(doc).encode())
        return path

    def _start_etcd(self) -> None:
        peer = free_port()
        data = self.workdir / "etcd"
        log = (self.workdir / "etcd.log").open("ab")
        self.etcd = subprocess.Popen(
            [
                str(self.tools.etcd),
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # a throwaway store: durability costs seconds on a slow disk
                "--log-level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait(self.etcd, self.workdir / "etcd.log", "etcd", self._etcd_healthy, 30)

    def _apiserver_args(self) -> list[str]:
        p = self.pki
        return [
            str(self.tools.apiserver),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={p.serving_cert}",
            f"--tls-private-key-file={p.serving_key}",
            f"--client-ca-file={p.ca_cert}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--api-audiences={SA_ISSUER}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--profiling=false",
            *self.extra_args,
        ]

    def _start_apiserver(self) -> None:
        started = time.monotonic()
        log = (self.workdir / "apiserver.log").open("ab")
        self.apiserver = subprocess.Popen(
            self._apiserver_args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait(self.apiserver, self.workdir / "apiserver.log", "kube-apiserver", self._apiserver_ready, 90)
        self.startup_seconds.append(time.monotonic() - started)

    def restart_apiserver(self, *, kill: bool = True) -> None:
        """Stop the API server (SIGKILL by default: no graceful goodbye to watchers) and start it again."""
        _stop(self.apiserver, signal.SIGKILL if kill else signal.SIGTERM)
        self.restarts += 1
        self._start_apiserver()

    async def restart_apiserver_async(self, *, kill: bool = True) -> None:
        await asyncio.to_thread(self.restart_apiserver, kill=kill)

    def _wait(self, proc: subprocess.Popen[bytes], log: Path, name: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KubeToolsError(f"{name} exited with {proc.returncode}; its log ends:\n{_tail(log)}")
            if ready():
                return
            time.sleep(0.2)
        raise KubeToolsError(f"{name} not ready after {timeout:.0f}s; its log ends:\n{_tail(log)}")

    # --- health and etcd -------------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return ctx

    def _apiserver_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2, context=self._ssl()) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _etcd_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(  # noqa: S310 - loopback etcd
            f"{self.etcd_url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return dict(json.loads(resp.read()))

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:  # noqa: S310
                return bool(json.loads(resp.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def etcd_revision(self) -> int:
        out = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"/registry/").decode(), "limit": 1})
        return int(out["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now: a watch from any older resourceVersion must then get 410 Gone."""
        revision = self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision


def start_cluster(workdir: Path | None = None, extra_args: tuple[str, ...] = ()) -> KubeCluster:
    tools = kube_tools()
    folder = workdir or Path(tempfile.mkdtemp(prefix="ztdpu-kube-"))
    return KubeCluster.start(tools, folder, extra_args)


@pytest.fixture(scope="session")
def kube_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """etcd + kube-apiserver for the session, built on first use. A build or start failure fails the test."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("kube"))
    except KubeToolsError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


# --- a cable to pull -----------------------------------------------------------------------------------------


class PausableProxy:
    """A loopback TCP forwarder to the API server that can cut every connection and refuse new ones.

    TLS passes through untouched (the serving certificate names 127.0.0.1), so a client pointed here talks to
    the real API server until `pause()`, and meanwhile other clients keep writing directly.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.paused = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> PausableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.pause()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def pause(self) -> None:
        self.paused = True
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def resume(self) -> None:
        self.paused = False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.paused:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()


# --- an admin client for tests -----------------------------------------------------------------------------


class KubeApi:
    """The `kubernetes` client as cluster admin. Every call runs on a thread, so that an in-process ztd on the
    test's event loop keeps running meanwhile (its watches would otherwise stall behind a blocking call)."""

    def __init__(self, kubeconfig: Path) -> None:
        import kubernetes

        self.client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.crds = kubernetes.client.ApiextensionsV1Api(self.client)
        self.models = kubernetes.client

    def close(self) -> None:
        self.client.close()

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # --- set-up ------------------------------------------------------------------------------------------------

    def _apply_crds(self) -> None:
        from kubernetes.client.exceptions import ApiException

        names = []
        for path in sorted(CRDS.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                names.append(doc["metadata"]["name"])
                try:
                    self.crds.create_custom_resource_definition(doc)
                except ApiException as err:
                    if err.status != 409:
                        raise
        deadline = time.monotonic() + 30
        for name in names:
            while True:
                crd = self.crds.read_custom_resource_definition(name)
                conditions = {c.type: c.status for c in (crd.status.conditions or [])} if crd.status else {}
                if conditions.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise KubeToolsError(f"CRD {name} not established after 30s")
                time.sleep(0.1)

    async def apply_crds(self) -> None:
        """Create the CRDs in manifests/crds/ (if absent) and wait until they are served."""
        await asyncio.to_thread(self._apply_crds)

    async def ensure(self, create: Any, *args: Any) -> None:
        """Create, ignoring AlreadyExists (tests share the session's cluster)."""
        from kubernetes.client.exceptions import ApiException

        try:
            await self.call(create, *args)
        except ApiException as err:
            if err.status != 409:
                raise

    async def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        await self.ensure(self.core.create_namespace, {"metadata": {"name": name, "labels": labels or {}}})

    async def service_account(self, namespace: str, name: str) -> None:
        await self.ensure(self.core.create_namespaced_service_account, namespace, {"metadata": {"name": name}})

    async def node(self, name: str, internal_ip: str = "") -> None:
        await self.ensure(self.core.create_node, {"metadata": {"name": name}})
        if internal_ip:
            status = {"status": {"addresses": [{"type": "InternalIP", "address": internal_ip}]}}
            await self.call(self.core.patch_node_status, name, status)

    async def pod(
        self,
        namespace: str,
        name: str,
        *,
        service_account: str,
        node: str,
        ip: str = "",
        labels: dict[str, str] | None = None,
        phase: str = "Running",
    ) -> str:
        """Create a pod scheduled on `node` (no kubelet: its status is written here) and return its uid."""
        body = {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "serviceAccountName": service_account,
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "app", "image": "registry.invalid/app:1", "ports": [{"containerPort": 8080}]}],
            },
        }
        created = await self.call(self.core.create_namespaced_pod, namespace, body)
        if ip or phase != "Pending":
            status: dict[str, Any] = {"phase": phase}
            if ip:
                status.update(podIP=ip, podIPs=[{"ip": ip}])
            await self.call(self.core.patch_namespaced_pod_status, name, namespace, {"status": status})
        return str(created.metadata.uid)

    async def delete_pod(self, namespace: str, name: str) -> None:
        # Grace 0: without a kubelet nobody would ever confirm a graceful termination.
        await self.call(self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0)

    async def token(
        self, namespace: str, service_account: str, *, audience: str, pod: str = "", uid: str = "", seconds: int = 600
    ) -> str:
        """A TokenRequest token (like the kubelet's projected istio-token), bound to a pod when given."""
        spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": seconds}
        if pod:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        out = await self.call(self.core.create_namespaced_service_account_token, service_account, namespace, body)
        return str(out.status.token)

    async def create_policy(self, namespace: str, body: dict[str, Any], version: str = "v1") -> None:
        kind = body["kind"]
        plural = {"AuthorizationPolicy": "authorizationpolicies", "PeerAuthentication": "peerauthentications"}[kind]
        body = {**body, "apiVersion": f"security.istio.io/{version}"}
        await self.call(
            self.custom.create_namespaced_custom_object, "security.istio.io", version, namespace, plural, body
        )

    async def delete_policy(self, namespace: str, kind: str, name: str) -> None:
        plural = {"AuthorizationPolicy": "authorizationpolicies", "PeerAuthentication": "peerauthentications"}[kind]
        await self.call(self.custom.delete_namespaced_custom_object, "security.istio.io", "v1", namespace, plural, name)


# --- raw REST as admin, and kubeconfigs for other identities -----------------------------------------------


@dataclass(frozen=True, slots=True)
class RestResponse:
    status: int
    body: dict[str, Any]
    warnings: tuple[str, ...]  # the API server's Warning headers (deprecations, Pod Security "would violate")


def rest(
    cluster: KubeCluster,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    query: dict[str, str] | None = None,
    token: str = "",
) -> RestResponse:
    """One API call as the cluster admin (or as `token`'s identity); blocking. Errors come back as responses."""
    url = f"{cluster.url}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()  # JSON is YAML too: apply-patch+yaml bodies go as JSON
        headers["Content-Type"] = content_type
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    else:
        ctx.load_cert_chain(str(cluster.pki.admin_cert), str(cluster.pki.admin_key))
    req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:  # noqa: S310
            status, raw, hdrs = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, hdrs = err.code, err.read(), err.headers
    parsed = json.loads(raw) if raw else {}
    return RestResponse(status, parsed, tuple(hdrs.get_all("Warning") or ()))


def token_kubeconfig(cluster: KubeCluster, path: Path, token: str) -> Path:
    """A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's, from TokenRequest)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": cluster.url, "certificate-authority": str(cluster.pki.ca_cert)}}
        ],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "token"}}],
        "current-context": "test",
    }
    _write_private(path, yaml.safe_dump(doc).encode())
    return path
