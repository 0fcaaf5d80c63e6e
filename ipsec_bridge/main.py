"""`zt-bridge`: identity-bound IPsec tunnels between pods, keyed by mTLS, programmed into XFRM.

Composition root: builds the XFRM socket (blocking mesh traffic first), the workload state and its source
(a YAML folder, or ztd's Delta ADS), the certificates (CreateCertificate with impersonation), the tunnel
manager, the handshake listener and the admin port, and owns their lifetimes in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ipsec_bridge.admin import Admin
from ipsec_bridge.adopt import summary as adopt_summary
from ipsec_bridge.allocator import Allocator
from ipsec_bridge.certs import Certificates
from ipsec_bridge.netns import Netns, NetnsError
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import Endpoints, SaManager, SaSettings, host_net
from ipsec_bridge.state import StateStore, ViewSettings
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.vfmap import VfMapError, VfMapFile
from ipsec_bridge.xds_client import DeltaXdsClient, XdsClientOptions
from ipsec_bridge.xfrm import messages as xm
from ipsec_bridge.xfrm.consts import XfrmGroup
from ipsec_bridge.xfrm.netlink import XfrmError, XfrmEvents, XfrmSocket, probe_offload
from ipsec_bridge.xfrm.offload import OffloadProbe, OffloadStatus
from ztcore import config
from ztcore.config import Duration, option
from ztcore.identity import Identity
from ztcore.identity.caclient import CAClient, CAClientOptions, token_identity
from ztcore.identity.manager import AgentMetrics, RotationPolicy, SecretManager
from ztcore.metrics import Registry

if TYPE_CHECKING:
    from ipsec_bridge.local_source import LocalConfigSource

log = logging.getLogger("zt-bridge")
_FAST_OPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
_FAST_OPEN_CLIENT, _FAST_OPEN_SERVER = 0x1, 0x2  # net.ipv4.tcp_fastopen bits (Documentation/networking/ip-sysctl)


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    ENV_PREFIX = "ZT_BRIDGE"

    node: str = option("", "this node's name (pods with spec.nodeName == it are local)", env="NODE_NAME")
    config_dir: Path | None = option(None, "workloads and policies from this folder of Kubernetes YAML (no xDS)")
    xds_address: str = option("", "workloads and policies from ztd's Delta ADS at this address")
    xds_plaintext: bool = option(False, "xDS without TLS (ztd's plaintext port 15010)")
    ca_address: str = option("127.0.0.1:15012", "CreateCertificate endpoint", env="CA_ADDR")
    ca_plaintext: bool = option(False, "talk to the CA without TLS (ztd --ca-plaintext; development only)")
    ca_server_name: str = option("istiod.istio-system.svc", "name the CA's (and xDS's) certificate is checked against")
    token_file: Path | None = option(None, "the bridge's token for the CA and xDS (a trusted node account)")
    root_cert: Path = option(Path(".ztd/root-cert.pem"), "mesh root bundle: trust for the CA, xDS and peers")
    trust_domain: str = option("cluster.local", "SPIFFE trust domain", env="TRUST_DOMAIN")
    cluster_id: str = option("Kubernetes", "cluster id sent to the CA and xDS", env="CLUSTER_ID")
    bridge_account: str = option(
        "istio-system/ztunnel", "NS/SA the bridges run as (their host-network pods give node addresses)"
    )
    node_address: str = option("", "this node's underlay address [default: its bridge pod's address in WDS]")
    tunnel_scope: str = option("pod", "one handshake per pod pair, or per node pair", choices=("pod", "node"))
    setup: str = option(
        "eager",
        "tunnels for every admitted pair at once, or on a pair's first packet (XFRM ACQUIRE; pod scope)",
        choices=("eager", "on-demand"),
    )
    idle_timeout: Duration = option(
        Duration(600), "with --setup on-demand: remove a tunnel whose SAs carried no byte this long (0 = never)"
    )
    eager_for: tuple[str, ...] = option(
        [],
        "with --setup on-demand: pairs with a pod of this NS/SA (NS/* = the namespace) are latency-critical: "
        "set up at once and never reclaimed (repeatable)",
    )
    listen_address: str = option("0.0.0.0", "address the handshake listener binds (in --netns)")  # noqa: S104
    port: int = option(15009, "handshake port of every bridge")
    netns: str = option("", "network namespace of the XFRM state, pods' routes and the handshake sockets")
    mesh_cidr: tuple[str, ...] = option([], "pod CIDR(s) whose cross-node traffic must be encrypted (required)")
    offload_dev: str = option("", "device for XFRM offload (with --offload crypto|packet)")
    offload: str = option("none", "XFRM offload of SAs", choices=("none", "crypto", "packet"))
    vf_map: Path | None = option(
        None, "YAML list of this node's VFs (vf, pod and/or ip, netdev): only pods with exactly one get tunnels"
    )
    key_bits: int = option(128, "AES-GCM key size in bits: 128 or 256")
    rekey_interval: Duration = option(Duration(3600), "rekey every tunnel this often (with 10% jitter)")
    grace: Duration = option(Duration(2), "keep the previous generation's SAs this long after a rekey")
    handshake_timeout: Duration = option(Duration(10), "deadline of one handshake")
    tcp_fast_open: bool = option(
        False,
        "handshake connections carry their first bytes in the SYN (TCP Fast Open: one network round trip fewer per "
        "handshake where the ClientHello fits in it; turns on net.ipv4.tcp_fastopen's client and server bits in "
        "--netns)",
    )
    sa_soft_bytes: int = option(1 << 40, "rekey when an SA has carried this many bytes (kernel soft limit)")
    sa_soft_packets: int = option(1 << 31, "rekey when an SA has carried this many packets (kernel soft limit)")
    cert_ttl: Duration = option(Duration(24 * 3600), "requested lifetime of the pods' certificates")
    admin_address: str = option("127.0.0.1", "address of the admin port")
    admin_port: int = option(15030, "HTTP port for /config_dump, /metrics, /ready, POST /rekey (0 = off)")
    config_poll: Duration = option(Duration(0.5), "how often --config-dir is checked for changes")
    log_level: str = option("info", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))
    # TLS 1.3 resumption for rekeys and re-established pairs (issue 15)
    resumption: bool = option(True, "rekey by resuming the TLS session (psk_dhe_ke: fresh ECDHE, no signatures)")
    max_resumptions: int = option(8, "a full handshake after this many resumptions in a row")
    ticket_max_age: Duration = option(
        Duration(3600), "a full handshake this long after the last one; also the TLS ticket lifetime and key rotation"
    )

    def __post_init__(self) -> None:
        if not self.node:
            raise ValueError("--node is required (or NODE_NAME)")
        if (self.config_dir is None) == (not self.xds_address):
            raise ValueError("give exactly one source: --config-dir or --xds-address")
        if self.token_file is None:
            raise ValueError("--token-file is required: the bridge's credential for the CA")
        for name in ("port", "admin_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} {value} is not a port number")
        if self.key_bits not in (128, 256):
            raise ValueError(f"--key-bits {self.key_bits}: AES-GCM keys are 128 or 256 bits")
        if self.offload != "none" and not self.offload_dev:
            raise ValueError("--offload crypto|packet needs --offload-dev")
        if self.node_address:
            ipaddress.ip_address(self.node_address)
        if self.rekey_interval < 1 or self.grace < 0 or self.handshake_timeout <= 0:
            raise ValueError("--rekey-interval must be at least 1s, --grace and --handshake-timeout positive")
        if not 0 < self.sa_soft_packets < (1 << 62) or not 0 < self.sa_soft_bytes < (1 << 62):
            raise ValueError("--sa-soft-bytes and --sa-soft-packets must be positive")
        if self.setup == "on-demand" and self.tunnel_scope != "pod":
            raise ValueError("--setup on-demand needs --tunnel-scope pod (node tunnels carry many pairs at once)")
        if self.idle_timeout < 0:
            raise ValueError(f"--idle-timeout {self.idle_timeout}s: must be 0 (never) or positive")
        if self.eager_for:
            self.settings()  # its checks: NS/SA or NS/*, and only with --setup on-demand
        if self.max_resumptions < 0 or not 1 <= self.ticket_max_age <= 7 * 24 * 3600:
            raise ValueError("--max-resumptions must be >= 0 and --ticket-max-age between 1s and 7 days (RFC 8446)")
        self.view_settings()

    def view_settings(self) -> ViewSettings:
        return ViewSettings.parse(self.mesh_cidr, self.trust_domain, self.bridge_account)

    def settings(self) -> BridgeSettings:
        return BridgeSettings(
            node=self.node,
            scope=TunnelScope(self.tunnel_scope),
            port=self.port,
            node_address=ipaddress.ip_address(self.node_address) if self.node_address else None,
            rekey_interval=float(self.rekey_interval),
            grace=float(self.grace),
            handshake_timeout=float(self.handshake_timeout),
            key_bytes=self.key_bits // 8,
            on_demand=self.setup == "on-demand",
            idle_timeout=float(self.idle_timeout),
            eager_for=tuple(self.eager_for),
            resumption=self.resumption,
            max_resumptions=self.max_resumptions,
            ticket_max_age=float(self.ticket_max_age),
        )


class BridgeError(Exception):
    pass


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel its tasks on a clean stop."""


class Bridge:
    def __init__(self, cfg: BridgeConfig) -> None:
        self.cfg = cfg
        self.metrics = Registry()
        self.ready = asyncio.Event()
        self.manager: TunnelManager | None = None
        self.vf_map: VfMapFile | None = None
        self.offload: OffloadProbe | None = None
        self.allocator = Allocator()

    def _credential(self) -> Identity:
        assert self.cfg.token_file is not None
        try:
            token = self.cfg.token_file.read_text().strip()
        except OSError as err:
            raise BridgeError(f"cannot read token file {self.cfg.token_file}: {err.strerror}") from None
        identity = token_identity(token, self.cfg.trust_domain)
        if identity is None:
            raise BridgeError(f"token file {self.cfg.token_file} names no service account")
        return identity

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        view_settings = cfg.view_settings()
        # what can be checked without touching the kernel is checked first
        if cfg.config_dir is not None and not await asyncio.to_thread(cfg.config_dir.is_dir):
            raise BridgeError(f"--config-dir {cfg.config_dir} is not a folder")
        await asyncio.to_thread(self._credential)
        if cfg.vf_map is not None:
            self.vf_map = VfMapFile(cfg.vf_map, poll_interval=float(cfg.config_poll))
            try:
                await self.vf_map.load_initial()
            except VfMapError as err:
                raise BridgeError(str(err)) from None
        netns = Netns(cfg.netns or None)
        try:
            await netns.check()
            xfrm = await XfrmSocket.open(cfg.netns or None)
        except (NetnsError, XfrmError) as err:
            netns.close()
            raise BridgeError(str(err)) from None
        # Everything opened from here on is closed in reverse order, each close even when an earlier one raised.
        async with contextlib.AsyncExitStack() as closers:
            closers.callback(log.info, "zt-bridge stopped")
            closers.callback(xfrm.close)
            closers.callback(netns.close)
            try:
                await self._run(stop, netns, xfrm, view_settings, closers)
            finally:
                self.ready.clear()

    async def _run(
        self,
        stop: asyncio.Event,
        netns: Netns,
        xfrm: XfrmSocket,
        view_settings: ViewSettings,
        closers: contextlib.AsyncExitStack,
    ) -> None:
        cfg = self.cfg
        ifindex = 0
        if cfg.offload != "none":
            try:
                ifindex = await netns.ifindex(cfg.offload_dev)
            except OSError:
                raise BridgeError(f"--offload-dev {cfg.offload_dev}: no such device in the node's netns") from None
        sa = SaManager(
            xfrm,
            SaSettings(
                mesh_cidrs=view_settings.mesh_cidrs,
                soft_bytes=cfg.sa_soft_bytes,
                # the hard limit leaves room for the rekey the soft one starts (then the kernel deletes the SA)
                hard_bytes=cfg.sa_soft_bytes + cfg.sa_soft_bytes // 2,
                soft_packets=cfg.sa_soft_packets,
                hard_packets=cfg.sa_soft_packets + cfg.sa_soft_packets // 2,
                offload_mode=cfg.offload,
                offload_ifindex=ifindex,
                on_demand=cfg.setup == "on-demand",
            ),
        )
        closers.callback(sa.close)
        try:
            # the block goes in before anything else can happen; a previous run's tunnels are adopted or removed
            adoption = await sa.start(TunnelScope(cfg.tunnel_scope), cfg.settings().node_address)
        except XfrmError as err:
            raise BridgeError(f"installing the default block: {err}") from None
        log.info("mesh %s blocked between nodes until tunnels exist (%s)",
                 ", ".join(map(str, view_settings.mesh_cidrs)), adopt_summary(adoption))  # fmt: skip
        if cfg.offload != "none":
            await self._probe_offload(xfrm, sa)
        if cfg.setup == "on-demand":
            await self._hold_first_packets(netns)
        if cfg.tcp_fast_open:
            await self._fast_open(netns)  # before the listener: it takes Fast Open only if asked at listen()

        monotonic = time.monotonic  # the one clock of the state store and the tunnels (latencies span both)
        store = StateStore(view_settings, monotonic=monotonic)
        if self.vf_map is not None:
            self.vf_map.subscribe(lambda vf_map: store.set_vf_map(cfg.node, vf_map))
        credential = await asyncio.to_thread(self._credential)
        if credential != view_settings.bridge_identity:
            log.warning("the token names %s, but --bridge-account says bridges run as %s", credential,
                        view_settings.bridge_identity)  # fmt: skip
        source: LocalConfigSource | DeltaXdsClient
        if cfg.config_dir is not None:
            # only here: the registry and translator are ~2 MiB of imports a bridge fed over xDS never needs
            from ipsec_bridge.local_source import LocalConfigSource, RegistryLoadError, TranslateOptions

            source = LocalConfigSource(
                cfg.config_dir,
                store,
                TranslateOptions(cluster_id=cfg.cluster_id, trust_domain=cfg.trust_domain),
                poll_interval=float(cfg.config_poll),
            )
            try:
                await source.load_initial()
            except RegistryLoadError as err:
                raise BridgeError(str(err)) from None
        else:
            store.expect_types(store.handlers())
            source = DeltaXdsClient(
                XdsClientOptions(
                    address=cfg.xds_address,
                    node_name=cfg.node,
                    node_ip=cfg.node_address or "0.0.0.0",  # noqa: S104 - reported, never bound
                    namespace=view_settings.bridge_namespace,
                    cluster_id=cfg.cluster_id,
                    plaintext=cfg.xds_plaintext,
                    root_cert=None if cfg.xds_plaintext else cfg.root_cert,
                    server_name=cfg.ca_server_name,
                    token_file=None if cfg.xds_plaintext else cfg.token_file,
                ),
                store.handlers(),
            )

        ca = CAClient(
            CAClientOptions(
                address=cfg.ca_address,
                root_cert=None if cfg.ca_plaintext else cfg.root_cert,
                server_name=cfg.ca_server_name,
                token_file=cfg.token_file,
                cluster_id=cfg.cluster_id,
                plaintext=cfg.ca_plaintext,
            )
        )
        closers.push_async_callback(ca.close)
        scope = TunnelScope(cfg.tunnel_scope)
        secrets = SecretManager(
            ca,
            RotationPolicy(ttl=dt.timedelta(seconds=float(cfg.cert_ttl))),
            credential_identity=credential,
            keep=credential if scope is TunnelScope.NODE else None,
            metrics=AgentMetrics(self.metrics),
        )
        certs = Certificates(secrets, ticket_lifetime=max(1, int(cfg.ticket_max_age)))
        manager = self.manager = TunnelManager(
            cfg.settings(), store, sa, certs, netns, BridgeMetrics(self.metrics), monotonic=monotonic
        )
        manager.adopt(adoption)  # before the listener: handshakes wait until adoption is decided
        try:
            sock = await netns.listen(cfg.listen_address, cfg.port)
        except OSError as err:
            raise BridgeError(f"cannot listen on {cfg.listen_address}:{cfg.port}: {err.strerror}") from None
        server = await asyncio.start_server(manager.serve_connection, sock=sock)

        async def close_server() -> None:
            server.close()
            await server.wait_closed()

        closers.push_async_callback(close_server)
        events = await XfrmEvents.open((XfrmGroup.EXPIRE,), netns=cfg.netns or None)
        closers.callback(events.close)
        acquires: XfrmEvents | None = None
        if cfg.setup == "on-demand":
            # a socket of its own: a burst of ACQUIREs must not overflow the one that carries EXPIREs
            acquires = await XfrmEvents.open((XfrmGroup.ACQUIRE,), netns=cfg.netns or None)
            closers.callback(acquires.close)
        if cfg.admin_port:
            admin = Admin(
                manager,
                store,
                netns,
                self.metrics,
                extra=lambda: {
                    "resumption": manager.generations.resumption_dump(),
                    **({"xds": dataclasses.asdict(source.status)} if isinstance(source, DeltaXdsClient) else {}),
                },
                vf_map=self.vf_map,
                offload=self.offload,
            )
            runner = web.AppRunner(admin.app(), access_log=None)
            await runner.setup()
            closers.push_async_callback(runner.cleanup)
            try:
                await web.TCPSite(runner, cfg.admin_address, cfg.admin_port).start()
            except OSError as err:
                raise BridgeError(f"cannot listen on {cfg.admin_address}:{cfg.admin_port}: {err.strerror}") from None
        self.ready.set()
        log.info("zt-bridge for node %s: %s scope, handshakes on %s:%d%s", cfg.node, scope.value,
                 cfg.listen_address, cfg.port, f" in netns {cfg.netns}" if cfg.netns else "")  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(secrets.run(), name="certificates")
                tg.create_task(source.run(), name="state-source")
                tg.create_task(manager.run(), name="tunnels")
                tg.create_task(manager.watch_expire(events), name="expire-events")
                if acquires is not None:
                    tg.create_task(manager.watch_acquire(acquires), name="acquire-events")
                if self.vf_map is not None:
                    tg.create_task(self.vf_map.run(), name="vf-map")
                tg.create_task(self.allocator.run(), name="allocator-trim")
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass

    @property
    def _where(self) -> str:
        """The namespace whose sysctls the bridge sets, as its log lines name it."""
        return f"netns {self.cfg.netns}" if self.cfg.netns else "this netns"

    async def _hold_first_packets(self, netns: Netns) -> None:
        """On-demand: the kernel holds a new pair's first packets while its tunnel is set up, instead of dropping
        them (net.core.xfrm_larval_drop=0: a queue of <= 100 packets per trap policy, re-looked up with a doubling
        wait from 0.1 s; Linux 6.1 frees it once the wait reaches 60 s, or at once when its head meets a BLOCK)."""

        def write() -> None:
            with open("/proc/sys/net/core/xfrm_larval_drop", "w", encoding="ascii") as f:
                f.write("0")

        try:
            await netns.run(write)
        except OSError as err:
            raise BridgeError(f"--setup on-demand: cannot set net.core.xfrm_larval_drop=0: {err.strerror}") from None
        log.info("on-demand set-up: net.core.xfrm_larval_drop=0 in %s: first packets wait for their tunnel",
                 self._where)  # fmt: skip

    async def _fast_open(self, netns: Netns) -> None:
        """Handshake connections with TCP Fast Open (RFC 7413): after a first connection has fetched the peer
        bridge's cookie, the preamble and ClientHello leave in the SYN, and the responder starts its TLS flight
        before the TCP handshake completes. The server bit only serves listeners that ask for it (ours); the
        kernel falls back to a plain connect by itself (no cookie yet, a full queue, a path that drops SYN data).
        A SYN's data can be delivered twice; ours is a preamble and a ClientHello, which open nothing by
        themselves."""

        def enable() -> tuple[int, int]:
            with open(_FAST_OPEN_SYSCTL, encoding="ascii") as f:
                before = int(f.read().split()[0])
            after = before | _FAST_OPEN_CLIENT | _FAST_OPEN_SERVER
            if after != before:
                with open(_FAST_OPEN_SYSCTL, "w", encoding="ascii") as f:
                    f.write(str(after))
            return before, after

        try:
            before, after = await netns.run(enable)
        except (OSError, ValueError, IndexError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "unreadable value"
            log.warning("TCP Fast Open off for handshakes: cannot set net.ipv4.tcp_fastopen in %s: %s", self._where,
                        reason)  # fmt: skip
            return
        netns.fast_open = True
        change = f"{before} -> {after}" if after != before else f"{after}, already on"
        log.info("handshakes use TCP Fast Open: net.ipv4.tcp_fastopen=%s in %s", change, self._where)

    async def _probe_offload(self, xfrm: XfrmSocket, sa: SaManager) -> None:
        """One throwaway SA built like a tunnel's (on documentation addresses): says at start, in one line,
        whether the device takes the offload; the tunnels' own installs stay the authority."""
        ip = ipaddress.ip_address
        ends = Endpoints(ip("192.0.2.1"), ip("192.0.2.2"), host_net(ip("198.51.100.1")), host_net(ip("203.0.113.1")))

        def throwaway() -> xm.SecurityAssociation:
            aead = xm.Aead(os.urandom(self.cfg.key_bits // 8), os.urandom(4))
            return sa.outbound_sa(ends, 0xFFFFFF01, aead, sa.next_reqid(), esn=sa.settings.esn)

        self.offload = await probe_offload(xfrm, throwaway(), self.cfg.offload_dev, self.cfg.offload)
        if self.offload.esn_refused:
            # A driver without ESN offload takes the same SAs with 32-bit sequence numbers: this node then keys
            # its tunnels without ESN (the handshake tells each peer, whose SAs for the tunnel follow).
            sa.settings = dataclasses.replace(sa.settings, esn=False)
            self.offload = await probe_offload(xfrm, throwaway(), self.cfg.offload_dev, self.cfg.offload)
        level = logging.ERROR if not self.offload.usable else logging.INFO
        if self.offload.status is OffloadStatus.FALLBACK:
            level = logging.WARNING
        log.log(level, "%s", self.offload.describe())


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # the format shows no process id or name: a record need not ask for them (os.getpid() is a syscall each)
    logging.logProcesses = False
    logging.logMultiprocessing = False


async def _amain(cfg: BridgeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Bridge(cfg).run(stop)


def raise_open_files_limit() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE up to the hard one, as Go programs do at start: every handshake, rekey request and
    teardown request holds a socket on both bridges, and a bulk set-up runs many at once (eager set-up of 2,000
    pairs ran out of descriptors at the usual soft limit of 1,024 in UML). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):  # above the kernel's nr_open: keep what we have
            return soft, soft
        return soft, want
    return soft, soft


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config.load(BridgeConfig, argv, prog="zt-bridge", description=__doc__.splitlines()[0])
    configure_logging(cfg.log_level)
    raise_open_files_limit()
    Allocator().tune()  # the process's, before its first burst (the initial xDS response)
    try:
        asyncio.run(_amain(cfg))
    except BridgeError as err:
        print(f"zt-bridge: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
