"""Time to bring up N pod-pair tunnels between two nodes in pod scope vs node scope, signatures counted.

    .venv/bin/python bench/tunnel_scale.py [--local-pods 100] [--remote-pods 100] [--repeat 1]
                                           [--concurrency 32] [--raw 400] [--json]

Boots user-mode-linux (Linux 6.1, tests/kernel/uml.py) and runs itself inside with `--inside`: two netns
("nodes" A and B, a veth between them); one process plays both bridges with the code zt-bridge runs
(ipsec_bridge.handshake + ipsec_bridge.sa_manager). Node A has `local-pods` pods, node B `remote-pods`; every
A x B pod pair is admitted (100 x 100 = 10,000 pairs). Before each timed bring-up both nodes hold only the
default block policies and the bypass policies of their own pods (identical in both scopes, not timed).

- pod scope: one handshake per pod pair (`concurrency` in flight, the bridge's default 32): TCP connect,
  preamble + mutual TLS 1.3 (ECDSA P-256), accept/ready/done, ALLOCSPI, exporter keys, inbound + outbound SA and
  the pair's out/in/fwd policies on both nodes. Per node: 2 SAs and 3 policies per pair.
- node scope: what `desired_specs` makes of the same pairs with --tunnel-scope node: one handshake between the
  nodes (keys bound to the node addresses), ONE pair of SAs per node with 0.0.0.0/0 selectors, and the
  same 3 policies per admitted pod pair pointing at that SA (GenerationInstaller with every pair's selector).
- peer in the same run: `raw` plain mutual TLS 1.3 handshakes (same certificates, contexts, IO code and
  concurrency), i.e. the signature-bound floor for pod scope.

Signatures: every handshake is a full TLS 1.3 mutual one (tickets and the session cache are off), so each one
that completes has produced two ECDSA signatures (the server's and the client's CertificateVerify) and four
verifications (each side: the peer's CertificateVerify and its leaf's signature by the CA). The counters below
count handshakes that completed on *both* sides with the peer's certificate checked; signatures = 2 x that.

After each bring-up both nodes' SAs and policies are dumped: counts must match, and every SPI's key on A must
equal the key of the same SPI on B. UML has one CPU and slow syscalls: absolute times are functional only, the
ratios are what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.inside_uml import run_inside  # noqa: E402
from bench.tunnels import ID_A, ID_B, NODE_A, NODE_B, PORT, Side, credentials, run_many, topology  # noqa: E402
from ipsec_bridge import handshake as hs  # noqa: E402
from ipsec_bridge.keys import KeyScope  # noqa: E402
from ipsec_bridge.netns import Netns  # noqa: E402
from ipsec_bridge.sa_manager import BRIDGE_MARK, Endpoints, GenerationInstaller, SaManager, SaSettings  # noqa: E402
from ipsec_bridge.xfrm.netlink import XfrmSocket  # noqa: E402

ANY = ip_network("0.0.0.0/0")
BRIDGE_HANDSHAKE_TIMEOUT = 10.0  # BridgeSettings.handshake_timeout: what a node-scope handshake must fit in


def pod_ip(node: int, i: int) -> IPv4Address:
    """Pod i of node 1 (A) or 2 (B): 10.<node>.<i // 250>.<i % 250 + 1>."""
    hi, lo = divmod(i, 250)
    return IPv4Address(f"10.{node}.{hi}.{lo + 1}")


def pairs(local_pods: int, remote_pods: int) -> list[tuple[IPv4Address, IPv4Address]]:
    """Every (A pod, B pod) pair, A pods outer: the order pod_pairs() yields them."""
    return [(pod_ip(1, i), pod_ip(2, j)) for i in range(local_pods) for j in range(remote_pods)]


def per_node_objects(scope: str, n_pairs: int, local_pods: int, blocks: int = 2) -> dict[str, int]:
    """What one node (A) holds after the bring-up: SAs and policies (block + bypass + per pair)."""
    sas = 2 * n_pairs if scope == "pod" else 2
    return {"sas": sas, "policies": blocks + 2 * local_pods + 3 * n_pairs}


@dataclass
class Counters:
    initiated: int = 0  # handshakes the initiator completed (responder's certificate checked)
    responded: int = 0  # handshakes the responder completed (initiator's certificate checked)

    def both(self) -> int:
        return min(self.initiated, self.responded)


def host(ip: IPv4Address) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


async def inside(local_pods: int, remote_pods: int, repeat: int, concurrency: int, raw_count: int) -> dict[str, Any]:
    await asyncio.to_thread(topology)
    with tempfile.TemporaryDirectory(dir="/run") as tmp:
        cred_a, cred_b = await asyncio.to_thread(credentials, Path(tmp))
    sides: dict[str, Side] = {}
    for name, cred, local, peer in (("a", cred_a, NODE_A, NODE_B), ("b", cred_b, NODE_B, NODE_A)):
        xfrm = await XfrmSocket.open(f"bench-{name}")
        sa = SaManager(xfrm, SaSettings(mesh_cidrs=(ip_network("10.0.0.0/8"),)))
        ctx = await asyncio.to_thread(hs.tls_context, cred)
        sides[name] = Side(Netns(f"bench-{name}"), xfrm, sa, cred, ctx, local, peer)
    a, b = sides["a"], sides["b"]
    all_pairs = pairs(local_pods, remote_pods)
    n = len(all_pairs)
    pods = {"a": [pod_ip(1, i) for i in range(local_pods)], "b": [pod_ip(2, j) for j in range(remote_pods)]}
    counters = Counters()

    async def reset() -> None:
        for name, s in sides.items():
            await s.xfrm.flush_sas()
            await s.xfrm.flush_policies()
            await s.sa.start()
            await s.sa.set_local_pods(pods[name])

    def pod_installer(side: Side, local_pod: IPv4Address, peer_pod: IPv4Address) -> GenerationInstaller:
        ep = Endpoints(side.local, side.peer, host(local_pod), host(peer_pod))
        return GenerationInstaller(side.sa, ep, ((host(local_pod), host(peer_pod)),), side.sa.next_reqid(), None)

    def node_installer(side: Side, initiator: bool) -> GenerationInstaller:
        # tunnels.desired.desired_specs, node scope: Endpoints(node, peer node, 0/0, 0/0) + one selector per pod pair
        sels = tuple((host(x), host(y)) if initiator else (host(y), host(x)) for x, y in all_pairs)
        return GenerationInstaller(
            side.sa, Endpoints(side.local, side.peer, ANY, ANY), sels, side.sa.next_reqid(), None
        )

    def plan(side: Side, peer: Any, inst: GenerationInstaller, ini: IPv4Address, resp: IPv4Address) -> hs.Plan:
        return hs.Plan(side.cred, side.ctx, peer, ini, resp, inst, lambda: None)

    handlers: set[asyncio.Task[Any]] = set()
    node_install_s: list[float] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            pre = await hs.read_preamble(reader)
            if pre.scope is KeyScope.NODE:
                await hs.respond(reader, writer, pre, plan(b, ID_A, node_installer(b, False), NODE_A, NODE_B))
            else:
                src, dst = pre.addresses()
                assert isinstance(src, IPv4Address) and isinstance(dst, IPv4Address)
                await hs.respond(reader, writer, pre, plan(b, ID_A, pod_installer(b, dst, src), src, dst))
            counters.responded += 1
        finally:
            writer.close()
            handlers.discard(task)

    async def serve_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            channel = hs.TlsChannel(b.ctx, server=True, reader=reader, writer=writer)
            await channel.handshake()
            channel.peer()
            counters.responded += 1
            await channel.close()
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(serve, sock=await b.netns.listen(str(NODE_B), PORT))
    raw_server = await asyncio.start_server(serve_raw, sock=await b.netns.listen(str(NODE_B), PORT + 1))

    async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await a.netns.connect(str(NODE_B), port, 60)

    async def pod_tunnel(i: int) -> None:
        pod_a, pod_b = all_pairs[i]
        reader, writer = await connect(PORT)
        try:
            pre = hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, str(pod_a), str(pod_b))
            await hs.initiate(reader, writer, pre, plan(a, ID_B, pod_installer(a, pod_a, pod_b), pod_a, pod_b))
            counters.initiated += 1
        finally:
            writer.close()

    async def node_tunnel(_: int) -> None:
        reader, writer = await connect(PORT)
        try:
            pre = hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.NODE, "node-a", "node-b")
            result = await hs.initiate(reader, writer, pre, plan(a, ID_B, node_installer(a, True), NODE_A, NODE_B))
            node_install_s.append(result.seconds)
            counters.initiated += 1
        finally:
            writer.close()

    async def raw(_: int) -> None:
        reader, writer = await connect(PORT + 1)
        try:
            channel = hs.TlsChannel(a.ctx, server=False, reader=reader, writer=writer)
            await channel.handshake()
            channel.peer()
            counters.initiated += 1
            await channel.close()
        finally:
            writer.close()

    async def verify(scope: str) -> dict[str, int]:
        dumps = {k: [i for i in await s.xfrm.list_sas() if i.sa.mark == BRIDGE_MARK] for k, s in sides.items()}
        policies = {k: len(await s.xfrm.list_policies()) for k, s in sides.items()}
        keys_b = {i.sa.spi: i.sa.aead for i in dumps["b"]}
        mismatched = sum(1 for i in dumps["a"] if keys_b.get(i.sa.spi) != i.sa.aead)
        want_a = per_node_objects(scope, n, local_pods)
        want_b = per_node_objects(scope, n, remote_pods)
        got = (len(dumps["a"]), policies["a"], len(dumps["b"]), policies["b"])
        want = (want_a["sas"], want_a["policies"], want_b["sas"], want_b["policies"])
        if mismatched or got != want:
            raise RuntimeError(f"{scope}: {mismatched} SA keys differ; SAs/policies A, B = {got}, wanted {want}")
        return {"sas_per_node": got[0], "policies_node_a": got[1], "policies_node_b": got[3]}

    async def timed(count: int, conc: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, int]:
        counters.initiated = counters.responded = 0
        start = time.perf_counter()
        await run_many(count, conc, one)
        while handlers:  # the responder's last ones: a tunnel is up when both nodes have it
            await asyncio.wait(set(handlers))
        return time.perf_counter() - start, counters.both()

    runs: dict[str, list[dict[str, Any]]] = {"pod": [], "node": [], "raw_tls": []}
    await reset()
    # untimed warm-up (crypto templates, slab growth, thread pool): a few tunnels of each kind
    for scope_run in (pod_tunnel, raw):
        await run_many(min(20, n), concurrency, scope_run)
        while handlers:
            await asyncio.wait(set(handlers))
    await reset()
    for round_no in range(repeat):
        order = ["node", "pod", "raw_tls"] if round_no % 2 == 0 else ["raw_tls", "pod", "node"]
        for name in order:
            if name == "raw_tls":
                seconds, done = await timed(raw_count, concurrency, raw)
                runs[name].append({"seconds": seconds, "handshakes": done, "per_s": raw_count / seconds})
                continue
            await reset()
            if name == "pod":
                seconds, done = await timed(n, concurrency, pod_tunnel)
            else:
                seconds, done = await timed(1, 1, node_tunnel)
            start = time.perf_counter()
            checked = await verify(name)
            verify_s = time.perf_counter() - start
            runs[name].append(
                {"seconds": seconds, "handshakes": done, "signatures": 2 * done, "checked": checked,
                 "verify_dump_s": verify_s}
            )  # fmt: skip
            await reset()
    server.close()
    raw_server.close()
    for s in sides.values():
        s.sa.close()
        s.xfrm.close()
        s.netns.close()

    def med(name: str) -> float:
        return float(statistics.median(r["seconds"] for r in runs[name]))

    raw_rate = statistics.median(r["per_s"] for r in runs["raw_tls"])
    return {
        "pairs": n,
        "local_pods": local_pods,
        "remote_pods": remote_pods,
        "concurrency": concurrency,
        "repeat": repeat,
        "raw_count": raw_count,
        "kernel": os.uname().release,
        "runs": runs,
        "pod_median_s": med("pod"),
        "node_median_s": med("node"),
        "node_handshake_s": node_install_s,
        "raw_tls_per_s": raw_rate,
        "raw_tls_floor_s": n / raw_rate,
        "ratio_pod_vs_node": med("pod") / med("node"),
    }


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} s (1 run)"
    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs)"


def report(r: dict[str, Any]) -> str:
    n = r["pairs"]
    pod, node = r["runs"]["pod"][-1], r["runs"]["node"][-1]
    pod_t = [x["seconds"] for x in r["runs"]["pod"]]
    node_t = [x["seconds"] for x in r["runs"]["node"]]
    lines = [
        f"{n:,} pod-pair tunnels ({r['local_pods']} x {r['remote_pods']} pods), {r['concurrency']} handshakes in"
        f" flight, UML Linux {r['kernel']} (functional timings; compare ratios):",
        f"  pod scope:  {spread(pod_t)}; {pod['handshakes']:,} handshakes, {pod['signatures']:,} ECDSA signatures;"
        f" {pod['checked']['sas_per_node']:,} SAs + {pod['checked']['policies_node_a']:,} policies on node A;"
        f" {1000 * statistics.median(pod_t) / n:.2f} ms per tunnel",
        f"  node scope: {spread(node_t)}; {node['handshakes']} handshake, {node['signatures']} ECDSA signatures;"
        f" {node['checked']['sas_per_node']} SAs + {node['checked']['policies_node_a']:,} policies on node A;"
        f" {1000 * statistics.median(node_t) / n:.3f} ms per pod pair",
        f"  node-scope handshake incl. its {3 * n:,}-policy install: {max(r['node_handshake_s']):.2f} s"
        f" (zt-bridge's handshake timeout: {BRIDGE_HANDSHAKE_TIMEOUT:.0f} s)",
        f"  raw TLS 1.3 mutual handshakes (same run): {r['raw_tls_per_s']:.1f}/s -> {n:,} of them alone take"
        f" {r['raw_tls_floor_s']:.1f} s",
        f"  pod scope / node scope: {r['ratio_pod_vs_node']:.1f}x the time;"
        f" signatures {pod['signatures']:,} vs {node['signatures']}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--local-pods", type=int, default=100)
    parser.add_argument("--remote-pods", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--raw", type=int, default=400, help="raw TLS handshakes per round (the peer)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds before the UML run is stopped")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (
        not (1 <= args.local_pods <= 62500 and 1 <= args.remote_pods <= 62500)
        or min(args.repeat, args.concurrency, args.raw) < 1
    ):
        print("tunnel_scale: pods must be 1..62500 per node; --repeat, --concurrency, --raw >= 1", file=sys.stderr)
        return 2
    if args.inside:
        measured = asyncio.run(inside(args.local_pods, args.remote_pods, args.repeat, args.concurrency, args.raw))
        print("RESULT " + json.dumps(measured))
        return 0
    inner: list[str] = []
    for flag in ("local_pods", "remote_pods", "repeat", "concurrency", "raw"):
        inner += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    result = run_inside("tunnel_scale", __file__, inner, timeout=args.timeout, mem="3G")
    if result is None:
        return 1
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
