"""`zt-agent`: the SDS node agent (pilot-agent's certificate role) for Envoy sidecars and gateways.

Composition root: builds the CA client, the secret manager, the cache, the SDS source and server, and owns
their lifetimes in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web
from cryptography import x509

from sds.agent.sds_source import SdsSource
from sds.agent.server import SdsServer, SdsServerError, socket_path
from ztcore import config
from ztcore.config import Duration, option
from ztcore.daemon import run_daemon
from ztcore.filewatch import Contents, FileWatcher
from ztcore.identity import Identity, IdentityError
from ztcore.identity.caclient import KEY_TYPES, CAClient, CAClientOptions, token_identity
from ztcore.identity.manager import AgentMetrics, RotationPolicy, SecretManager
from ztcore.metrics import Registry
from ztcore.xds.cache import SnapshotCache
from ztcore.xds.grpc_adapter import XdsMetrics, XdsStreams

log = logging.getLogger("zt-agent")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    ENV_PREFIX = "ZT_AGENT"

    ca_address: str = option("127.0.0.1:15012", "CreateCertificate endpoint (TLS)", env="CA_ADDR")
    ca_server_name: str = option("istiod.istio-system.svc", "name the CA's serving certificate is checked against")
    root_cert: Path = option(
        Path(".ztd/root-cert.pem"), "root bundle ztd publishes: trust for the CA, and the initial ROOTCA (watched)"
    )
    token_file: Path | None = option(None, "service-account token for the CA (re-read at every request)")
    cert: Path | None = option(None, "client certificate chain for the CA, instead of a token (with --key)")
    key: Path | None = option(None, "private key of --cert")
    ca_plaintext: bool = option(False, "talk to the CA without TLS (ztd --ca-plaintext; development only)")
    socket_root: Path = option(Path("."), "folder under which ./var/run/secrets/workload-spiffe-uds/socket is made")
    cluster_id: str = option("Kubernetes", "sent to the CA as the clusterid header", env="CLUSTER_ID")
    trust_domain: str = option("cluster.local", "SPIFFE trust domain", env="TRUST_DOMAIN")
    namespace: str = option("", "workload namespace when the token does not name one", env="POD_NAMESPACE")
    service_account: str = option(
        "", "workload service account when the token does not name one", env="SERVICE_ACCOUNT"
    )
    secret_ttl: Duration = option(Duration(24 * 3600), "requested certificate lifetime", env="SECRET_TTL")
    grace_ratio: float = option(0.5, "renew when this share of the lifetime is left", env="SECRET_GRACE_PERIOD_RATIO")
    grace_jitter: float = option(0.01, "random ± added to --grace-ratio", env="SECRET_GRACE_PERIOD_RATIO_JITTER")
    key_type: str = option("ecdsa-p256", "workload key type", choices=KEY_TYPES)
    ca_timeout: Duration = option(Duration(10), "deadline of one CreateCertificate call")
    file_poll_interval: Duration = option(Duration(1), "how often watched files are checked")
    monitoring_address: str = option("127.0.0.1", "address of the monitoring port")
    monitoring_port: int = option(0, "HTTP port for /metrics, /ready and /debug (0 = off)")
    log_level: str = option("info", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert and --key go together")
        if self.token_file is None and self.cert is None:
            raise ValueError("give --token-file or --cert/--key to authenticate to the CA")
        if self.token_file is not None and self.cert is not None:
            raise ValueError("give --token-file or --cert/--key, not both")
        if bool(self.namespace) != bool(self.service_account):
            raise ValueError("--namespace and --service-account go together")
        if not 0 <= self.monitoring_port <= 65535:
            raise ValueError(f"--monitoring-port {self.monitoring_port} is not a port number")
        if self.file_poll_interval <= 0:
            raise ValueError("--file-poll-interval must be positive")
        self.policy()  # validates TTL, ratios and key type

    def policy(self) -> RotationPolicy:
        return RotationPolicy(
            ttl=dt.timedelta(seconds=self.secret_ttl),
            grace_ratio=self.grace_ratio,
            grace_jitter=self.grace_jitter,
            key_type=self.key_type,
        )

    @property
    def socket(self) -> Path:
        return socket_path(self.socket_root)


class AgentError(Exception):
    pass


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def resolve_identities(cfg: AgentConfig) -> tuple[Identity | None, Identity]:
    """(whom our credential names, the default identity served). Reads the token or cert file."""
    credential: Identity | None = None
    if cfg.token_file is not None:
        try:
            token = cfg.token_file.read_text().strip()
        except OSError as err:
            raise AgentError(f"cannot read token file {cfg.token_file}: {err.strerror}") from None
        credential = token_identity(token, cfg.trust_domain)
    elif cfg.cert is not None:
        try:
            leaf = x509.load_pem_x509_certificate(cfg.cert.read_bytes())
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier
            )
        except OSError as err:
            raise AgentError(f"cannot read client certificate {cfg.cert}: {err.strerror}") from None
        except (ValueError, x509.ExtensionNotFound):
            uris = []
        for uri in uris:
            try:
                credential = Identity.parse(uri)
                break
            except IdentityError:
                continue
    if cfg.namespace:
        try:
            return credential, Identity.for_account(cfg.trust_domain, cfg.namespace, cfg.service_account)
        except IdentityError as err:
            raise AgentError(f"--namespace/--service-account: {err}") from None
    if credential is None:
        raise AgentError("the credential names no service account; give --namespace and --service-account")
    return credential, credential


class Agent:
    def __init__(
        self, cfg: AgentConfig, *, clock: Callable[[], dt.datetime] = _utcnow, rng: random.Random | None = None
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._rng = rng
        self.metrics = Registry()
        self.cache = SnapshotCache()
        self.ready = asyncio.Event()  # the socket is listening
        self.secrets: SecretManager
        self.streams: XdsStreams
        self.server: SdsServer

    def _build(self) -> None:
        cfg = self.cfg
        credential, default = resolve_identities(cfg)
        self.default_identity = default
        self.ca = CAClient(
            CAClientOptions(
                address=cfg.ca_address,
                root_cert=None if cfg.ca_plaintext else cfg.root_cert,
                server_name=cfg.ca_server_name,
                token_file=cfg.token_file,
                cert_file=cfg.cert,
                key_file=cfg.key,
                cluster_id=cfg.cluster_id,
                timeout=float(cfg.ca_timeout),
                plaintext=cfg.ca_plaintext,
            )
        )
        self.secrets = SecretManager(
            self.ca,
            cfg.policy(),
            credential_identity=credential,
            keep=default,
            clock=self._clock,
            rng=self._rng,
            metrics=AgentMetrics(self.metrics),
        )
        self.files = FileWatcher(float(cfg.file_poll_interval))
        self.source = SdsSource(
            self.cache, self.secrets, self.files, trust_domain=cfg.trust_domain, default_identity=default
        )
        self.streams = XdsStreams(self.cache, self.source, metrics=XdsMetrics(self.metrics), clock=self._clock)
        self.server = SdsServer(cfg.socket, self.streams)
        root_path = cfg.root_cert

        def root_changed(contents: Contents) -> None:
            data = contents.get(root_path)
            if data:
                self.secrets.update_roots("file", data)
            else:
                log.warning("root bundle %s is missing or empty; keeping the current trust bundle", root_path)

        self.files.watch([root_path], root_changed)
        log.info(
            "identity %s (credential %s), CA %s, socket %s",
            default,
            credential or "unnamed",
            cfg.ca_address,
            cfg.socket,
        )

    async def _monitoring(self) -> web.AppRunner | None:
        if not self.cfg.monitoring_port:
            return None
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=self.metrics.render().encode(), headers={"Content-Type": self.metrics.content_type}
            )

        async def ready(_: web.Request) -> web.Response:
            if self.ready.is_set() and self.secrets.current(self.default_identity) is not None:
                return web.Response(text="ready\n")
            return web.Response(status=503, text="no workload certificate yet\n")

        async def syncz(_: web.Request) -> web.Response:
            return web.json_response([s.as_dict() for s in self.streams.streams()], dumps=_dumps)

        async def certs(_: web.Request) -> web.Response:
            out = []
            for identity in self.secrets.identities():
                cert = self.secrets.current(identity)
                if cert is not None:
                    out.append(
                        {
                            "identity": identity.uri,
                            "serial": f"{cert.serial:x}",
                            "not_before": cert.not_before.isoformat(),
                            "not_after": cert.not_after.isoformat(),
                        }
                    )
            return web.json_response(out, dumps=_dumps)

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/ready", ready)
        app.router.add_get("/debug/syncz", syncz)
        app.router.add_get("/debug/certs", certs)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.cfg.monitoring_address, self.cfg.monitoring_port).start()
        except OSError as err:
            await runner.cleanup()
            raise AgentError(
                f"cannot listen on {self.cfg.monitoring_address}:{self.cfg.monitoring_port}: {err.strerror}"
            ) from None
        return runner

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self._build)
        await self.server.start()
        try:
            runner = await self._monitoring()
        except BaseException:
            await self.server.stop()
            await self.ca.close()
            raise
        try:
            self.ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.secrets.run(), name="secrets")
                tg.create_task(self.files.run(), name="files")
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            self.ready.clear()
            await self.server.stop()
            await self.ca.close()
            if runner is not None:
                await runner.cleanup()
            log.info("zt-agent stopped")


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2)


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel its tasks on a clean stop."""


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config.load(AgentConfig, argv, prog="zt-agent", description=__doc__.splitlines()[0])
    return run_daemon("zt-agent", Agent(cfg).run, log_level=cfg.log_level, expected=(AgentError, SdsServerError))


if __name__ == "__main__":
    sys.exit(main())
