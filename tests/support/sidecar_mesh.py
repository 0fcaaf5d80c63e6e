"""The sidecar mesh of the real-Envoy end-to-end tests: three pods on loopback addresses, their services, the
applications behind them, and the sidecars' node identities.

Shared by the static-config test (tests/e2e/test_envoy_sidecars.py) and the ADS one (tests/e2e/test_ads_envoy.py).
The `billing` sidecar is an impostor: its node metadata claims shop/other, so the agent gives it that identity
while the registry says its pod runs as shop/billing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.helpers import free_port
from tests.support import envoy as ev


@dataclass(frozen=True)
class Ports:
    front: int = field(default_factory=free_port)  # frontend's app port
    cart_http: int = field(default_factory=free_port)  # cart's container ports
    cart_tcp: int = field(default_factory=free_port)
    billing: int = field(default_factory=free_port)
    svc_front: int = field(default_factory=free_port)  # service ports (what clients dial)
    svc_cart: int = field(default_factory=free_port)
    svc_db: int = field(default_factory=free_port)
    svc_billing: int = field(default_factory=free_port)


def mesh_yaml(p: Ports) -> str:
    def pod(name: str, sa: str, ip: str, app: str, ports: str = "[]") -> str:
        return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}
spec:
  serviceAccountName: {sa}
  nodeName: node-a
  containers: [{{name: app, ports: {ports}}}]
status: {{podIP: {ip}}}
"""

    def service(name: str, app: str, ports: str) -> str:
        return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{app: {app}}}
  clusterIP: None
  ports: {ports}
"""

    return "\n".join(
        [
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}",
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-a, namespace: istio-system}\n"
            "spec: {serviceAccountName: ztunnel, nodeName: node-a}",
            pod("frontend-1", "frontend", "127.0.0.2", "frontend", f"[{{name: http, containerPort: {p.front}}}]"),
            pod(
                "cart-1",
                "cart",
                "127.0.0.3",
                "cart",
                f"[{{name: http, containerPort: {p.cart_http}}}, {{name: tcp-db, containerPort: {p.cart_tcp}}}]",
            ),
            pod("billing-1", "billing", "127.0.0.4", "billing", f"[{{name: http, containerPort: {p.billing}}}]"),
            # Runs nowhere; its account is the identity the impostor gets (the CA checks a pod of it is on node-a).
            pod("other-1", "other", "127.0.0.9", "other"),
            service("frontend", "frontend", f"[{{name: http, port: {p.svc_front}, targetPort: http}}]"),
            service("cart", "cart", f"[{{name: http, port: {p.svc_cart}, targetPort: {p.cart_http}}}]"),
            service("cart-db", "cart", f"[{{name: tcp-db, port: {p.svc_db}, targetPort: tcp-db}}]"),
            service("billing", "billing", f"[{{name: http-api, port: {p.svc_billing}, targetPort: http}}]"),
        ]
    )


@dataclass
class App:
    """What the applications behind the sidecars saw."""

    requests: list[dict[str, str]] = field(default_factory=list)
    billing_requests: int = 0


@contextlib.asynccontextmanager
async def applications(p: Ports) -> AsyncIterator[App]:
    """cart's HTTP app and TCP echo, billing's HTTP app; all on 127.0.0.1 only (never the pod address)."""
    seen = App()

    async def cart(request: web.Request) -> web.Response:
        seen.requests.append({"host": request.host, "xfcc": request.headers.get("x-forwarded-client-cert", "")})
        return web.Response(text="hello from cart\n")

    async def billing(_: web.Request) -> web.Response:
        seen.billing_requests += 1
        return web.Response(text="billing\n")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1024)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    runners = []
    for handler, port in ((cart, p.cart_http), (billing, p.billing)):
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    tcp = await asyncio.start_server(echo, "127.0.0.1", p.cart_tcp)
    try:
        yield seen
    finally:
        tcp.close()
        await tcp.wait_closed()
        for runner in runners:
            await runner.cleanup()


@dataclass(frozen=True)
class Sidecar:
    pod: str
    ip: str
    account: str  # what the node metadata claims (the agent issues this identity)
    bind: str

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.pod}.shop~shop.svc.cluster.local"

    @property
    def metadata(self) -> dict[str, str]:
        # No capture here (all sidecars share one network namespace): each listener binds its own socket.
        return {
            "NAMESPACE": "shop",
            "SERVICE_ACCOUNT": self.account,
            "ZTDPU_OUTBOUND_BIND": self.bind,
            "INTERCEPTION_MODE": "NONE",
        }


SIDECARS = (
    Sidecar("frontend-1", "127.0.0.2", "frontend", "127.0.1.2"),
    Sidecar("cart-1", "127.0.0.3", "cart", "127.0.1.3"),
    Sidecar("billing-1", "127.0.0.4", "other", "127.0.1.4"),
)


async def wait_for_secrets(envoy: ev.EnvoyProcess, within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while True:
            names = {s.get("name") for s in (await envoy.secrets()).get("dynamic_active_secrets", [])}
            if {"default", "ROOTCA"} <= names:
                return
            await asyncio.sleep(0.05)


async def get(http: aiohttp.ClientSession, address: str, port: int, host: str) -> tuple[int, str]:
    async with http.get(f"http://{address}:{port}/", headers={"Host": host}) as resp:
        return resp.status, await resp.text()
