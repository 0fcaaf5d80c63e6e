"""The two-node mesh the bridge tests share (the host tests and the UML kernel tests), and the view built from it.

    node-a 192.168.50.1: a1 shop/frontend 10.1.0.10, a2 shop/debug 10.1.0.11
    node-b 192.168.50.2: b1 payments/ledger 10.2.0.10, b2 shop/cart 10.2.0.11

Policies: payments/deny-debug (DENY shop/debug anywhere in payments), shop/debug-allow-cart (only cart may
reach debug), shop/cart-allow-ledger (only ledger may reach cart, port 8080). Tunnels that follow:
{a1,b1} both ways admitted -> node-a initiates (lower address); {a1,b2} only b2->a1 -> node-b initiates;
{a2,b2} only b2->a2 -> node-b initiates; {a2,b1} refused both ways.
"""

from __future__ import annotations

from pathlib import Path

from ipsec_bridge.local_source import LocalConfigSource
from ipsec_bridge.state import StateStore, ViewSettings
from ztcore.fsutil import write_atomic
from ztcore.mesh.translate import TranslateOptions

NODE_A_IP, NODE_B_IP = "192.168.50.1", "192.168.50.2"
PODS = {
    # name: (namespace, service account, app label, node, ip)
    "a1": ("shop", "frontend", "frontend", "node-a", "10.1.0.10"),
    "a2": ("shop", "debug", "debug", "node-a", "10.1.0.11"),
    "b1": ("payments", "ledger", "ledger", "node-b", "10.2.0.10"),
    "b2": ("shop", "cart", "cart", "node-b", "10.2.0.11"),
}
MESH_CIDR = "10.0.0.0/8"


def identity(pod: str) -> str:
    ns, sa, *_ = PODS[pod]
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


def _pod(name: str, ns: str, sa: str, app: str, node: str, ip: str, host: bool = False) -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  serviceAccountName: {sa}
  nodeName: {node}
  hostNetwork: {"true" if host else "false"}
  containers: [{{name: main, image: example.com/{app}:1}}]
status:
  phase: Running
  podIP: {ip}
"""


POLICIES = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: payments}
spec:
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/debug"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: debug-allow-cart, namespace: shop}
spec:
  selector: {matchLabels: {app: debug}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/cart"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-allow-ledger, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/payments/sa/ledger"]}}]
      to: [{operation: {ports: ["8080"]}}]
"""


# Added to POLICIES: frontend -> ledger denied, ledger -> frontend still allowed (the pair stays admitted, and
# node-b initiates it now).
DENY_FRONTEND_TO_LEDGER = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: payments}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
"""

# Added to POLICIES: frontend and ledger denied to each other both ways (the revoke the kernel tests apply).
DENY_FRONTEND_LEDGER = (
    DENY_FRONTEND_TO_LEDGER
    + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-deny-ledger, namespace: shop}
spec:
  selector: {matchLabels: {app: frontend}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/payments/sa/ledger"]}}]}]
"""
)


def mesh_yaml(pods: dict[str, tuple[str, str, str, str, str]] | None = None) -> str:
    docs = [
        """apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Namespace, metadata: {name: istio-system}}
  - {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}}
  - {apiVersion: v1, kind: Namespace, metadata: {name: payments, labels: {istio.io/dataplane-mode: ambient}}}
  - {apiVersion: v1, kind: ServiceAccount, metadata: {name: ztunnel, namespace: istio-system}}
  - {apiVersion: v1, kind: ServiceAccount, metadata: {name: frontend, namespace: shop}}
  - {apiVersion: v1, kind: ServiceAccount, metadata: {name: debug, namespace: shop}}
  - {apiVersion: v1, kind: ServiceAccount, metadata: {name: cart, namespace: shop}}
  - {apiVersion: v1, kind: ServiceAccount, metadata: {name: ledger, namespace: payments}}
"""
    ]
    for node, ip in (("node-a", NODE_A_IP), ("node-b", NODE_B_IP)):
        docs.append(f"""---
apiVersion: v1
kind: Node
metadata: {{name: {node}}}
status:
  addresses: [{{type: InternalIP, address: {ip}}}]
""")
        # the bridge's own DaemonSet pod: host network, so its address is the node's underlay address
        docs.append(_pod(f"zt-bridge-{node}", "istio-system", "ztunnel", "zt-bridge", node, ip, host=True))
    for name, (ns, sa, app, node, ip) in (pods or PODS).items():
        docs.append(_pod(name, ns, sa, app, node, ip))
    return "".join(docs)


def write_mesh(
    folder: Path, policies: str = POLICIES, pods: dict[str, tuple[str, str, str, str, str]] | None = None
) -> Path:
    # each file whole or not at all, as an API server applies an object: ztd reads a file it sees change, and an
    # in-place write it caught between the truncate and the write (a busy host) had no objects for that moment
    write_atomic(folder / "mesh.yaml", mesh_yaml(pods).encode())
    write_atomic(folder / "policies.yaml", policies.encode())
    return folder


def settings() -> ViewSettings:
    return ViewSettings.parse([MESH_CIDR], "cluster.local", "istio-system/ztunnel")


async def load_view(folder: Path) -> StateStore:
    store = StateStore(settings())
    await LocalConfigSource(folder, store, TranslateOptions()).load_initial()
    return store
