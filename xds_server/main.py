"""`ztd`: the control plane (CA and xDS on the same ports), like istiod.

Composition root: the only module that knows every part. It builds the CA material, the token issuer, the
registry, the authenticators and the servers, and owns their lifetimes in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from sds.ca import issuer, keyring, signer
from sds.ca.kubesecret import KubeCASource
from sds.ca.nodeauthz import NodeAuthorizer, parse_trusted_accounts
from sds.ca.rootconfigmap import RootCertPublisher
from sds.ca.server import CAMetrics, CertificateService
from sds.ca.tokenreview import KubeTokenReviewer
from xds_server.debug import DebugService
from xds_server.envoy_configs import EnvoyConfigs
from xds_server.publish import Publisher, PublishMetrics, PushTuning
from xds_server.registry.kube import KubeRegistrySource, KubeSourceError, load_api_client
from xds_server.server import ADS_SERVICE, AdsServicer, AdsSource, add_ads_to_server, control_plane_identifier
from ztcore import authn, config, tlsfront
from ztcore.config import Duration, option
from ztcore.daemon import run_daemon
from ztcore.envoy import load_generator
from ztcore.fsutil import ensure_private_dir, write_atomic
from ztcore.kubeclient import describe_error
from ztcore.lease import LEASE_NAME, KubeLeaseStore, LeaseElector, LeaseTiming
from ztcore.mesh.registry.files import FileRegistrySource, RegistryLoadError
from ztcore.mesh.registry.store import Registry
from ztcore.mesh.translate import TranslateOptions
from ztcore.mesh.translate.mesh import ALLOW_ANY, REGISTRY_ONLY
from ztcore.metrics import Registry as MetricsRegistry
from ztcore.xds.cache import SnapshotCache
from ztcore.xds.grpc_adapter import XdsMetrics, XdsStreams

log = logging.getLogger("ztd")

ISTIOD_DNS_NAMES = ("istiod.istio-system.svc", "istiod.istio-system", "istiod", "localhost")
CA_SERVICE = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name


@dataclasses.dataclass(frozen=True)
class ZtdConfig:
    ENV_PREFIX = "ZTD"

    listen_address: str = option("127.0.0.1", "address every port binds to")
    xds_port: int = option(15010, "plaintext gRPC port (xDS; the CA too with --ca-plaintext)")
    secure_port: int = option(15012, "TLS gRPC port: CA and xDS, serving cert for istiod.istio-system.svc")
    monitoring_port: int = option(15014, "HTTP port for /metrics, /ready and /debug")
    state_dir: Path = option(Path(".ztd"), "folder for CA material, the token issuer key and the root bundle")
    config_dir: Path | None = option(None, "folder of Kubernetes YAML (Pods, Services, policies) to serve from")
    kubeconfig: str = option("", "Kubernetes mode: kubeconfig file, or in-cluster; empty: embedded registry")
    namespace: str = option(
        "istio-system",
        "Kubernetes mode: ztd's namespace (CA Secrets cacerts / istio-ca-secret, Lease ztd-leader)",
        env_aliases=("POD_NAMESPACE",),
    )
    pod_name: str = option(
        "", "Kubernetes mode: this replica's Lease holder identity [empty: host name]", env_aliases=("POD_NAME",)
    )
    lease_duration: Duration = option(Duration(15), "Kubernetes mode: a standby takes a Lease unrenewed this long")
    lease_renew_deadline: Duration = option(
        Duration(10), "Kubernetes mode: a leader that cannot renew for this long stops its leader duties"
    )
    lease_retry_period: Duration = option(Duration(2), "Kubernetes mode: how often the Lease is renewed or retried")
    self_signed_root_check_interval: Duration = option(
        Duration(3600),
        "Kubernetes mode: how often the leader checks the self-signed root for rotation; negative: never",
        env="CITADEL_SELF_SIGNED_ROOT_CERT_CHECK_INTERVAL",
    )
    self_signed_root_grace_percentile: int = option(
        20,
        "Kubernetes mode: re-issue the self-signed root when less than this percentage of its lifetime is left",
        env="CITADEL_SELF_SIGNED_ROOT_CERT_GRACE_PERIOD_PERCENTILE",
    )
    ca_secret_wait: Duration = option(
        Duration(60), "Kubernetes mode: how long a standby waits at startup for the leader to create istio-ca-secret"
    )
    trust_domain: str = option("cluster.local", "SPIFFE trust domain", env="TRUST_DOMAIN")
    cluster_id: str = option("Kubernetes", "cluster id accepted in the clusterid metadata", env="CLUSTER_ID")
    outbound_traffic_policy: str = option(
        ALLOW_ANY,
        "meshConfig.outboundTrafficPolicy.mode: where captured sidecars send traffic to destinations the registry "
        "does not know (ALLOW_ANY: through; REGISTRY_ONLY: nowhere)",
        choices=(ALLOW_ANY, REGISTRY_ONLY),
    )
    cacerts_dir: Path | None = option(
        None, "plug-in CA folder (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)", env="ROOT_CA_DIR"
    )
    ca_key_algorithm: str = option(
        "ecdsa-p256", "key type of a self-signed root created on first start", choices=keyring.KEY_ALGORITHMS
    )
    self_signed_ca_cert_ttl: Duration = option(
        Duration(3650 * 86400), "lifetime of a self-signed root", env="CITADEL_SELF_SIGNED_CA_CERT_TTL"
    )
    default_workload_cert_ttl: Duration = option(
        Duration(24 * 3600), "TTL when a request asks for none", env="DEFAULT_WORKLOAD_CERT_TTL"
    )
    max_workload_cert_ttl: Duration = option(
        Duration(90 * 86400), "largest TTL a request may ask for (larger is refused)", env="MAX_WORKLOAD_CERT_TTL"
    )
    ca_trusted_node_accounts: tuple[str, ...] = option(
        ["istio-system/ztunnel"],
        "ns/sa accounts allowed to impersonate pods on their node",
        env="CA_TRUSTED_NODE_ACCOUNTS",
    )
    token_audiences: tuple[str, ...] = option(["istio-ca"], "accepted JWT audiences", env="TOKEN_AUDIENCES")
    local_issuer: bool = option(True, "mint/accept service-account tokens signed by the state folder's issuer key")
    oidc_issuer: str = option("", "accept JWTs from this OIDC issuer (with --oidc-jwks-file)")
    oidc_jwks_file: Path | None = option(None, "JWKS file of --oidc-issuer, re-read when it changes")
    tls_san: tuple[str, ...] = option([], "extra DNS names or IPs for the serving certificate")
    ca_plaintext: bool = option(False, "also serve the CA on the plaintext port (tokens only; for development)")
    root_cert_file: Path | None = option(
        None, "where to publish the root bundle for clients [default: <state-dir>/root-cert.pem]"
    )
    debounce_after: Duration = option(
        Duration(0.1), "quiet time after a registry change before it is pushed", env="PILOT_DEBOUNCE_AFTER"
    )
    debounce_max: Duration = option(
        Duration(10), "longest a registry change waits for quiet before it is pushed", env="PILOT_DEBOUNCE_MAX"
    )
    push_throttle: int = option(
        min(15 + 5 * (os.cpu_count() or 1), 100),
        "heavy xDS pushes (initial syncs, responses of 100+ resources) built or in flight at once",
        env="PILOT_PUSH_THROTTLE",
    )
    xds_auth: bool = option(True, "xDS on the secure port needs a client certificate or token", env="XDS_AUTH")
    # istiod's pkg/keepalive: ping an idle client every interval, drop it after the timeout; accept client pings
    # down to half the interval even without calls (ztunnel pings every 30 s), as istiod's EnforcementPolicy.
    keepalive_interval: Duration = option(
        Duration(30), "ping a client after this long without activity; clients may ping every half of it"
    )
    keepalive_timeout: Duration = option(Duration(10), "close a connection whose ping is unanswered this long")
    keepalive_max_server_connection_age: Duration = option(
        Duration(0), "close a connection this old gracefully so clients rebalance across replicas (0: never)"
    )
    log_level: str = option("info", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        if self.push_throttle < 1 or self.debounce_after < 0 or self.debounce_max < 0:
            raise ValueError("--push-throttle must be at least 1 and debounce times cannot be negative")
        if self.keepalive_interval < 1 or self.keepalive_timeout < 1 or self.keepalive_max_server_connection_age < 0:
            raise ValueError("--keepalive-interval and --keepalive-timeout must be 1s or more, the connection age >= 0")
        for name in ("xds_port", "secure_port", "monitoring_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} {port} is not a port number")
        if self.kubeconfig and self.config_dir is not None:
            raise ValueError("--config-dir and --kubeconfig are two registries; give one")
        if bool(self.oidc_issuer) != bool(self.oidc_jwks_file):
            raise ValueError("--oidc-issuer and --oidc-jwks-file go together")
        if self.max_workload_cert_ttl < self.default_workload_cert_ttl:
            raise ValueError("--max-workload-cert-ttl is smaller than --default-workload-cert-ttl")
        parse_trusted_accounts(self.ca_trusted_node_accounts)
        if not 0 < self.self_signed_root_grace_percentile < 100:
            raise ValueError("--self-signed-root-grace-percentile must be between 1 and 99")
        try:
            self.lease_timing()
        except ValueError as err:
            raise ValueError(f"--lease-retry-period/--lease-renew-deadline/--lease-duration: {err}") from None

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC servers' channel arguments: message size, and keepalive as istiod configures it."""
        interval_ms = int(self.keepalive_interval * 1000)
        options = [
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_time_ms", interval_ms),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),  # our pings, and the clients', with no call open
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle client
            ("grpc.http2.min_ping_interval_without_data_ms", interval_ms // 2),  # MinTime: Time / 2
        ]
        if self.keepalive_max_server_connection_age:
            options.append(("grpc.max_connection_age_ms", int(self.keepalive_max_server_connection_age * 1000)))
            options.append(("grpc.max_connection_age_grace_ms", 10_000))  # istiod's MaxServerConnectionAgeGrace
        return options

    def lease_timing(self) -> LeaseTiming:
        return LeaseTiming(self.lease_duration, self.lease_renew_deadline, self.lease_retry_period)

    @property
    def identity(self) -> str:
        return self.pod_name or socket.gethostname()

    @property
    def published_root(self) -> Path:
        return self.root_cert_file or self.state_dir / "root-cert.pem"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _EmptyDirectory:
    """The registry when no --config-dir is given: no pods, so no impersonation succeeds."""

    def get_pod(self, namespace: str, name: str) -> None:
        return None

    def count_pods_on_node(self, namespace: str, service_account: str, node_name: str) -> int:
        return 0

    def has_node(self, name: str) -> bool:
        return False


class ServingCert:
    """The TLS certificate of the secure port, issued by our own CA and renewed at half its life."""

    TTL = dt.timedelta(hours=24)

    def __init__(self, names: Sequence[str], material: Callable[[], keyring.CAMaterial]) -> None:
        self._names = list(names)
        self._material = material
        self.renew(_utcnow())

    def renew(self, now: dt.datetime) -> None:
        material = self._material()
        key = ec.generate_private_key(ec.SECP256R1())
        chain = signer.sign(key.public_key(), self._names, self.TTL, material, now)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._context = tlsfront.server_context("".join(chain).encode(), key_pem, material.root_bundle_pem.encode())
        self.refresh_at = now + self.TTL / 2

    def context(self) -> ssl.SSLContext:
        return self._context


class Ztd:
    def __init__(self, cfg: ZtdConfig) -> None:
        self.cfg = cfg
        self.metrics = MetricsRegistry()
        self.ready = asyncio.Event()
        self.registry: Registry | None = None
        self._source: FileRegistrySource | KubeRegistrySource | None = None
        self.kube_api: Any = None  # kubernetes.client.ApiClient in Kubernetes mode
        # Kubernetes mode: the ztd-leader Lease, and the CA from Secrets (unless --cacerts-dir is given).
        self.elector: LeaseElector | None = None
        self.kube_ca: KubeCASource | None = None
        self.root_publisher: RootCertPublisher | None = None
        # The CA side, built by _setup once the registry (and in Kubernetes mode the CA Secrets) is loaded.
        self.material: keyring.CAMaterial | None = None
        self.authenticators: list[authn.Authenticator] = []
        self.ca_metrics: CAMetrics | None = None
        self.serving: ServingCert | None = None
        self.front: tlsfront.TlsFront | None = None
        self.ca_secure: CertificateService | None = None
        self.ca_plain: CertificateService | None = None
        # The xDS side, built by _xds after _setup.
        self.xds_cache: SnapshotCache | None = None
        self.publisher: Publisher | None = None
        self.envoy_configs: EnvoyConfigs | None = None
        self.ads_source: AdsSource | None = None
        self.xds_streams: XdsStreams | None = None
        self.debug: DebugService | None = None
        self.ads_secure: AdsServicer | None = None
        self.ads_plain: AdsServicer | None = None

    def _current_material(self) -> keyring.CAMaterial:
        if self.material is None:
            raise RuntimeError("the CA material is not loaded yet")
        return self.material

    def _setup(self) -> None:
        cfg = self.cfg
        now = _utcnow()
        ensure_private_dir(cfg.state_dir)
        if self.kube_ca is not None:
            material = self.kube_ca.material
        else:
            material = keyring.load_or_create(
                cfg.cacerts_dir,
                cfg.state_dir / "ca",
                algorithm=cfg.ca_key_algorithm,
                trust_domain=cfg.trust_domain,
                self_signed_ttl=dt.timedelta(seconds=cfg.self_signed_ca_cert_ttl),
                now=now,
            )
        self.material = material
        write_atomic(cfg.published_root, material.root_bundle_pem.encode())
        log.info("root bundle published at %s", cfg.published_root)
        authenticators: list[authn.Authenticator] = [authn.ClientCertAuthenticator()]
        if cfg.local_issuer:
            tokens = issuer.load_or_create(cfg.state_dir / "issuer", cfg.trust_domain)
            authenticators.append(
                authn.JwtAuthenticator(
                    issuer=tokens.issuer,
                    audiences=cfg.token_audiences,
                    jwks=authn.JwksFile(cfg.state_dir / "issuer" / issuer.JWKS_FILE),
                    trust_domain=cfg.trust_domain,
                    name="LocalIssuerJwtAuthenticator",
                )
            )
        if cfg.oidc_issuer and cfg.oidc_jwks_file:
            authenticators.append(
                authn.JwtAuthenticator(
                    issuer=cfg.oidc_issuer,
                    audiences=cfg.token_audiences,
                    jwks=authn.JwksFile(cfg.oidc_jwks_file),
                    trust_domain=cfg.trust_domain,
                )
            )
        if self.kube_api is not None:
            authenticators.append(
                authn.KubeJwtAuthenticator(
                    KubeTokenReviewer(self.kube_api),
                    audiences=cfg.token_audiences,
                    trust_domain=cfg.trust_domain,
                    cluster_id=cfg.cluster_id,
                    pods=self.registry,
                )
            )
        self.authenticators = authenticators  # xDS on the secure port authenticates as the CA does
        trusted = parse_trusted_accounts(cfg.ca_trusted_node_accounts)
        directory = self.registry if self.registry is not None else _EmptyDirectory()
        node_authorizer = NodeAuthorizer(trusted, directory) if trusted else None
        self.ca_metrics = ca_metrics = CAMetrics(self.metrics, self._current_material, _utcnow)
        policy = signer.SignPolicy(
            default_ttl=dt.timedelta(seconds=cfg.default_workload_cert_ttl),
            max_ttl=dt.timedelta(seconds=cfg.max_workload_cert_ttl),
        )

        def ca_service(tls_peers: authn.PeerLookup | None) -> CertificateService:
            return CertificateService(
                material=self._current_material,
                authenticators=authenticators,
                node_authorizer=node_authorizer,
                policy=policy,
                metrics=ca_metrics,
                tls_peers=tls_peers,
            )

        names = [*ISTIOD_DNS_NAMES, *cfg.tls_san]
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(cfg.listen_address).is_unspecified:
                names.append(cfg.listen_address)
        self.serving = serving = ServingCert(names, self._current_material)
        self.front = front = tlsfront.TlsFront(cfg.listen_address, cfg.secure_port, 0, serving.context)
        self.ca_secure = ca_service(front.peer)
        self.ca_plain = ca_service(None)

    def _xds(self) -> None:
        """The ADS side: registry → publisher → cache → streams, on both gRPC servers, plus debug. The publish
        side (publisher, and EnvoyConfigs running the Envoy generator) fills the cache; the servicers only serve
        it."""
        cfg, front = self.cfg, self.front
        assert front is not None, "_setup runs first"
        self.xds_cache = cache = SnapshotCache()
        self.publisher = publisher = Publisher(
            self.registry if self.registry is not None else Registry(),
            cache,
            options=TranslateOptions(
                cluster_id=cfg.cluster_id,
                trust_domain=cfg.trust_domain,
                outbound_traffic_policy=cfg.outbound_traffic_policy,
            ),
            tuning=PushTuning(cfg.debounce_after, cfg.debounce_max),
            metrics=PublishMetrics(self.metrics),
        )
        # Registers its rebuild as the publisher's first listener, before freeze_heap: Envoy resources built
        # after a push are long-lived too.
        self.envoy_configs = EnvoyConfigs(cache, publisher, load_generator())
        self.ads_source = source = AdsSource(self.envoy_configs)
        publisher.add_listener(freeze_heap)
        control_plane = control_plane_identifier(cfg.identity, importlib.metadata.version("ztdpu"))
        self.xds_streams = streams = XdsStreams(
            cache,
            source,
            metrics=XdsMetrics(self.metrics),
            control_plane=control_plane,
            encoded_delta=True,  # add_ads_to_server's serializer sends the pre-serialised resources as they are
        )
        self.debug = debug = DebugService(
            streams, source, cache, cluster_id=cfg.cluster_id, control_plane=control_plane
        )
        throttle = asyncio.Semaphore(cfg.push_throttle)  # shared by both ports, as istiod's one push queue
        self.ads_secure, self.ads_plain = (
            AdsServicer(
                streams,
                source,
                debug,
                authenticators=self.authenticators,
                tls_peers=peers,
                require_auth=cfg.xds_auth,
                throttle=throttle,
            )
            for peers in (front.peer, None)
        )

    def _grpc_server(
        self, ca: CertificateService | None, ads: AdsServicer
    ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        server = grpc.aio.server(options=self.cfg.grpc_options())
        services = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        services.append(add_ads_to_server(ads, server))
        if ca is not None:
            ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(ca, server)
            services.append(CA_SERVICE)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(services, server)
        return server, health_servicer

    async def _monitoring(self) -> web.AppRunner:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=self.metrics.render().encode(), headers={"Content-Type": self.metrics.content_type}
            )

        async def ready(_: web.Request) -> web.Response:
            return web.Response(text="ready\n") if self.ready.is_set() else web.Response(status=503, text="starting\n")

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/ready", ready)
        if self.elector is not None:
            elector = self.elector

            async def leader(_: web.Request) -> web.Response:
                return web.json_response(
                    {**elector.status(), "lease": f"{self.cfg.namespace}/{LEASE_NAME}", "ca": self._ca_status()}
                )

            app.router.add_get("/debug/leader", leader)
        assert self.debug is not None, "_xds runs first"
        self.debug.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.cfg.listen_address, self.cfg.monitoring_port).start()
        return runner

    async def _rotate_serving_cert(self) -> None:
        serving, front = self.serving, self.front
        assert serving is not None and front is not None, "_setup runs first"
        while True:
            delay = max((serving.refresh_at - _utcnow()).total_seconds(), 1.0)
            await asyncio.sleep(delay)
            serving.renew(_utcnow())
            front.reload()
            log.info("renewed the serving certificate of the secure port")

    async def run(self, stop: asyncio.Event) -> None:
        if self.cfg.config_dir is not None:
            self.registry = Registry()
            self._source = FileRegistrySource(self.cfg.config_dir, self.registry)
            await self._source.load_initial()
        elif self.cfg.kubeconfig:
            self.registry = Registry()
            self.kube_api = await asyncio.to_thread(load_api_client, self.cfg.kubeconfig)
            self._source = KubeRegistrySource(self.kube_api, self.registry)
            try:
                await self._source.load_initial()
                await self._start_kube_ca()
            except BaseException:
                self.kube_api.close()
                raise
        await asyncio.to_thread(self._setup)
        self._xds()
        front, publisher = self.front, self.publisher
        assert front is not None and publisher is not None and self.ads_secure is not None
        assert self.ads_plain is not None
        await publisher.publish(publisher.registry.current)
        cfg = self.cfg
        # The secure port's gRPC server listens on loopback only; clients reach it through the TLS front.
        secure, secure_health = self._grpc_server(self.ca_secure, self.ads_secure)
        secure_addr = f"{cfg.listen_address}:{cfg.secure_port}"
        plain, plain_health = self._grpc_server(self.ca_plain if cfg.ca_plaintext else None, self.ads_plain)
        plain_addr = f"{cfg.listen_address}:{cfg.xds_port}"
        try:
            front.backend_port = secure.add_insecure_port("127.0.0.1:0")
            plain.add_insecure_port(plain_addr)
        except RuntimeError as err:
            raise StartupError(f"cannot listen on {plain_addr}: {err}") from None
        try:
            await front.start()
            runner = await self._monitoring()
        except OSError as err:
            raise StartupError(f"cannot listen on {cfg.listen_address}: {err.strerror}") from None
        await secure.start()
        await plain.start()
        for h in (secure_health, plain_health):
            await h.set("", health_pb2.HealthCheckResponse.SERVING)
            await h.set(CA_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            await h.set(ADS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        log.info(
            "ztd ready: secure %s (CA, xDS), plaintext %s (xDS), monitoring %s:%d, trust domain %s",
            secure_addr,
            plain_addr,
            cfg.listen_address,
            cfg.monitoring_port,
            cfg.trust_domain,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._rotate_serving_cert())
                tg.create_task(sweep_heap())
                tg.create_task(publisher.run())
                if self._source is not None:
                    tg.create_task(self._source.run())
                if self.elector is not None:
                    tg.create_task(self.elector.run())
                    tg.create_task(self.elector.while_leading(self._leader_duties))
                if self.kube_ca is not None:
                    tg.create_task(self.kube_ca.run())
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            self.ready.clear()
            for h in (secure_health, plain_health):
                await h.enter_graceful_shutdown()
            await front.close()
            await asyncio.gather(secure.stop(2.0), plain.stop(2.0))
            await runner.cleanup()
            if self.kube_ca is not None:
                self.kube_ca.close()
            if self.elector is not None:
                await self.elector.release()
            if self.kube_api is not None:
                await asyncio.to_thread(self.kube_api.close)
            log.info("ztd stopped")

    # --- Kubernetes mode: leadership and the CA from Secrets ------------------------------------------------------

    async def _start_kube_ca(self) -> None:
        """Campaign for the ztd-leader Lease and load the CA from Secrets (the Lease holder creates the
        self-signed root when there is none). The campaign runs here until the CA is loaded, then resumes in
        run()'s TaskGroup."""
        cfg = self.cfg
        timing = cfg.lease_timing()
        store = KubeLeaseStore(self.kube_api, cfg.namespace, request_timeout=max(1.0, timing.renew_deadline / 2))
        self.elector = elector = LeaseElector(store, cfg.identity, timing, describe_error=describe_error)
        self.metrics.function_gauge(
            "ztd_leader", "1 while this replica holds the ztd-leader Lease", lambda: 1.0 if elector.is_leader else 0.0
        )
        self.metrics.function_gauge(
            "ztd_leader_terms", "How often this replica became the leader", lambda: elector.terms
        )
        if cfg.cacerts_dir is not None:
            return  # an explicit plug-in folder wins over the Secrets
        self.kube_ca = kube_ca = KubeCASource(
            self.kube_api,
            cfg.namespace,
            elector,
            algorithm=cfg.ca_key_algorithm,
            trust_domain=cfg.trust_domain,
            self_signed_ttl=dt.timedelta(seconds=cfg.self_signed_ca_cert_ttl),
            wait_timeout=cfg.ca_secret_wait,
            poll=min(1.0, timing.retry),
            on_change=self._ca_changed,
        )
        self.metrics.function_gauge(
            "ztd_ca_material_swaps", "CA material swaps after a Secret change", lambda: kube_ca.swaps
        )
        async with asyncio.TaskGroup() as tg:
            campaign = tg.create_task(elector.run())
            try:
                await kube_ca.load_initial()
            finally:
                campaign.cancel()

    def _leader_duties(self, tg: asyncio.TaskGroup) -> None:
        """Singleton work, run only by the Lease holder and stopped when it steps down."""
        assert self.kube_api is not None and self.registry is not None
        # istiod's namespace controller: the root in an istio-ca-root-cert ConfigMap everywhere.
        self.root_publisher = RootCertPublisher(
            self.kube_api, self.registry, lambda: self._current_material().root_bundle_pem
        )
        tg.create_task(self.root_publisher.run())
        if self.kube_ca is not None:
            tg.create_task(self.kube_ca.keep_ca_secret())
            if self.cfg.self_signed_root_check_interval >= 0:
                tg.create_task(
                    self.kube_ca.rotate_root(
                        check_interval=max(self.cfg.self_signed_root_check_interval, 0.1),
                        grace_percentile=self.cfg.self_signed_root_grace_percentile,
                    )
                )

    async def _ca_changed(self, material: keyring.CAMaterial) -> None:
        """A Secret change: sign with the new material, re-issue the serving cert, publish the new root."""
        assert self.serving is not None and self.front is not None, "the Secrets are watched after _setup"
        self.material = material
        self.serving.renew(_utcnow())
        self.front.reload()
        await asyncio.to_thread(write_atomic, self.cfg.published_root, material.root_bundle_pem.encode())
        if self.root_publisher is not None and self.elector is not None and self.elector.is_leader:
            self.root_publisher.root_changed()
        log.info("CA material swapped (%s); root bundle republished", material.source)

    def _ca_status(self) -> dict[str, Any]:
        material = self._current_material()
        return {
            "source": material.source,
            "signing_cert": material.signing_cert.subject.rfc4514_string(),
            "root_not_after": material.root_not_after.isoformat(),
            "swaps": self.kube_ca.swaps if self.kube_ca is not None else 0,
        }


async def freeze_heap(_: object) -> None:
    """After a push, what is alive (registry, translation, resources) is long-lived: moving it out of the cyclic
    collector's sweep keeps full collections of a 10,000-workload heap (~150 ms) from stalling streams (p99
    convergence 90 ms with it, 282 ms without: docs/benchmarks.md). It costs nothing at push time; a
    gc.collect() first would scan the whole new translation (~150 ms) on the push's path. Frozen objects are
    still freed by reference counting when they die; those that die in reference cycles (a stream's tasks,
    garbage a reload should not have made) wait for `sweep_heap`. The registry parser makes no cyclic garbage
    (see parse._parse_stream): before, every reload's parse trees were frozen and never freed, 13 MB per change
    at 1,000 pods."""
    gc.freeze()


HEAP_SWEEP_INTERVAL = 600.0  # seconds


async def sweep_heap(interval: float = HEAP_SWEEP_INTERVAL) -> None:
    """Every 10 minutes, one full collection over the frozen heap too: objects that were alive when frozen and
    have since died in reference cycles (an ended stream's tasks and frames) are freed. One pause (~150 ms at
    10,000 workloads) per interval, instead of a leak that grows with every reconnecting client."""
    while True:
        await asyncio.sleep(interval)
        gc.unfreeze()
        gc.collect()
        gc.freeze()


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel its tasks on a clean stop."""


class StartupError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config.load(ZtdConfig, argv, prog="ztd", description=__doc__.splitlines()[0])
    return run_daemon(
        "ztd",
        Ztd(cfg).run,
        log_level=cfg.log_level,
        expected=(keyring.CAError, issuer.IssuerError, StartupError, RegistryLoadError, KubeSourceError),
    )


if __name__ == "__main__":
    sys.exit(main())
