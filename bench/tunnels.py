"""Tunnel setups per second (handshake + key export + SA/SP install) beside raw TLS 1.3 ECDSA handshakes per second.

    .venv/bin/python bench/tunnels.py [--count 200] [--concurrency 8] [--repeat 3] [--json]

Boots user-mode-linux (Linux 6.1, tests/kernel/uml.py) and runs itself inside with `--inside`: two netns
("nodes") joined by a veth; one process plays both bridges. Each round, in alternating order:

- tunnels: `count` pod-pair tunnels, `concurrency` at a time, each exactly the bridge's path: TCP connect from
  node A's netns, preamble + mutual TLS 1.3 (ECDSA P-256 SVIDs from our CA), identity checks, accept/ready/done
  (three round trips in all), ALLOCSPI on both sides, exporter keys, inbound SA (UPDSA) + outbound SA (NEWSA)
  + out/in/fwd policies on both nodes (ipsec_bridge.handshake + ipsec_bridge.sa_manager, the code zt-bridge runs);
  afterwards every SA is dumped and each SPI's key on one node compared with the other node's;
- raw TLS: `count` mutual TLS 1.3 handshakes (TCP connect, handshake, close_notify) with the same
  certificates, contexts and IO code (memory BIOs on asyncio, do_handshake in a worker thread), same netns,
  same concurrency, on a port of their own: no preamble, no exchange, no XFRM, nothing else.

The ratio tunnels/raw is the figure of merit (target >= 0.5). UML has one CPU and slow syscalls: absolute
rates are functional only, the ratio is what is measured (both run in the same kernel, same process).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402 (after the sys.path line)
from OpenSSL import SSL  # noqa: E402

from bench.inside_uml import run_inside  # noqa: E402
from ipsec_bridge import handshake as hs  # noqa: E402
from ipsec_bridge.keys import KeyScope  # noqa: E402
from ipsec_bridge.netns import Netns  # noqa: E402
from ipsec_bridge.sa_manager import BRIDGE_MARK, Endpoints, GenerationInstaller, SaManager, SaSettings  # noqa: E402
from ipsec_bridge.xfrm.netlink import XfrmSocket  # noqa: E402
from sds.ca import keyring, signer  # noqa: E402
from ztcore.identity import Identity  # noqa: E402
from ztcore.identity.caclient import private_key_pem  # noqa: E402

NODE_A, NODE_B = IPv4Address("192.168.60.1"), IPv4Address("192.168.60.2")
PORT = 15009
ID_A = Identity("cluster.local", "bench", "client")
ID_B = Identity("cluster.local", "bench", "server")


def pod_ips(i: int) -> tuple[IPv4Address, IPv4Address]:
    hi, lo = divmod(i, 250)
    return IPv4Address(f"10.1.{hi}.{lo + 1}"), IPv4Address(f"10.2.{hi}.{lo + 1}")


def topology() -> None:
    for cmd in (
        "ip netns add bench-a", "ip netns add bench-b",
        "ip link add eth0 netns bench-a type veth peer eth0 netns bench-b",
        f"ip -n bench-a addr add {NODE_A}/24 dev eth0", f"ip -n bench-b addr add {NODE_B}/24 dev eth0",
        "ip -n bench-a link set eth0 up", "ip -n bench-b link set eth0 up",
        "ip -n bench-a link set lo up", "ip -n bench-b link set lo up",
    ):  # fmt: skip
        subprocess.run(cmd.split(), check=True)


def credentials(tmp: Path) -> tuple[hs.Credential, hs.Credential]:
    now = dt.datetime.now(dt.UTC)
    material = keyring.load_or_create(
        None, tmp / "ca", algorithm="ecdsa-p256", trust_domain="cluster.local",
        self_signed_ttl=dt.timedelta(days=1), now=now,
    )  # fmt: skip
    out = []
    for identity in (ID_A, ID_B):
        key = ec.generate_private_key(ec.SECP256R1())
        chain = signer.sign(key.public_key(), [identity.uri], dt.timedelta(hours=2), material, now)
        out.append(
            hs.Credential(
                identity, "".join(chain).encode(), private_key_pem(key), material.root_bundle_pem.encode(),
                now + dt.timedelta(hours=2),
            )
        )  # fmt: skip
    return out[0], out[1]


@dataclass
class Side:
    netns: Netns
    xfrm: XfrmSocket
    sa: SaManager
    cred: hs.Credential
    ctx: SSL.Context
    local: IPv4Address
    peer: IPv4Address


def installer(side: Side, local_pod: IPv4Address, peer_pod: IPv4Address) -> GenerationInstaller:
    local_net, peer_net = ip_network(f"{local_pod}/32"), ip_network(f"{peer_pod}/32")
    ep = Endpoints(side.local, side.peer, local_net, peer_net)
    return GenerationInstaller(side.sa, ep, ((local_net, peer_net),), side.sa.next_reqid(), None)


def plan(side: Side, expected: Identity, inst: Any, initiator: IPv4Address, responder: IPv4Address) -> hs.Plan:
    return hs.Plan(side.cred, side.ctx, expected, initiator, responder, inst, lambda: None)


async def run_many(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> None:
        async with gate:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(guarded(i) for i in range(count)))
    return time.perf_counter() - start


async def inside(count: int, concurrency: int, repeat: int) -> dict[str, Any]:
    await asyncio.to_thread(topology)
    with tempfile.TemporaryDirectory(dir="/run") as tmp:
        cred_a, cred_b = await asyncio.to_thread(credentials, Path(tmp))
    sides = {}
    for name, cred, local, peer in (("a", cred_a, NODE_A, NODE_B), ("b", cred_b, NODE_B, NODE_A)):
        ns = Netns(f"bench-{name}")
        xfrm = await XfrmSocket.open(f"bench-{name}")
        sa = SaManager(xfrm, SaSettings(mesh_cidrs=(ip_network("10.0.0.0/8"),)))
        sides[name] = Side(ns, xfrm, sa, cred, await asyncio.to_thread(hs.tls_context, cred), local, peer)
    a, b = sides["a"], sides["b"]
    for side in sides.values():
        await side.sa.start()

    handlers: set[asyncio.Task[Any]] = set()

    def tracked(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(reader, writer)
            finally:
                handlers.discard(task)

        return run

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pre = await hs.read_preamble(reader)
            src, dst = pre.addresses()
            assert isinstance(src, IPv4Address) and isinstance(dst, IPv4Address)
            await hs.respond(reader, writer, pre, plan(b, ID_A, installer(b, dst, src), src, dst))
        finally:
            writer.close()

    async def serve_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel = hs.TlsChannel(b.ctx, server=True, reader=reader, writer=writer)
            await channel.handshake()
            await channel.close()
        finally:
            writer.close()

    server = await asyncio.start_server(tracked(serve), sock=await b.netns.listen(str(NODE_B), PORT))
    raw_server = await asyncio.start_server(tracked(serve_raw), sock=await b.netns.listen(str(NODE_B), PORT + 1))

    async def tunnel(i: int) -> None:
        pod_a, pod_b = pod_ips(i)
        reader, writer = await a.netns.connect(str(NODE_B), PORT, 30)
        try:
            pre = hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, str(pod_a), str(pod_b))
            await hs.initiate(reader, writer, pre, plan(a, ID_B, installer(a, pod_a, pod_b), pod_a, pod_b))
        finally:
            writer.close()

    async def raw(i: int) -> None:
        reader, writer = await a.netns.connect(str(NODE_B), PORT + 1, 30)
        try:
            channel = hs.TlsChannel(a.ctx, server=False, reader=reader, writer=writer)
            await channel.handshake()
            peer, _ = channel.peer()
            assert peer == ID_B
            await channel.close()
        finally:
            writer.close()

    async def verify_and_clear() -> dict[str, int]:
        dumps = {n: [i for i in await s.xfrm.list_sas() if i.sa.mark == BRIDGE_MARK] for n, s in sides.items()}
        policies = {n: len(await s.xfrm.list_policies()) for n, s in sides.items()}
        keys_b = {i.sa.spi: i.sa.aead for i in dumps["b"]}
        mismatched = sum(1 for i in dumps["a"] if keys_b.get(i.sa.spi) != i.sa.aead)
        if mismatched or len(dumps["a"]) != 2 * count or len(dumps["b"]) != 2 * count:
            raise RuntimeError(
                f"{mismatched} SAs differ between the nodes; SA counts {len(dumps['a'])}/{len(dumps['b'])}"
            )
        for s in sides.values():
            await s.xfrm.flush_sas()
            await s.xfrm.flush_policies()
            await s.sa.start()
        return {"sas_per_node": len(dumps["a"]), "policies_per_node": policies["a"]}

    actions = {"tunnels": tunnel, "raw_tls": raw}
    runs: dict[str, list[float]] = {k: [] for k in actions}
    checked: dict[str, int] = {}
    for round_no in range(-1, repeat):  # one untimed warm-up round (crypto templates, slab growth)
        order = list(actions) if round_no % 2 == 0 else list(reversed(actions))
        for name in order:
            seconds = await run_many(count if round_no >= 0 else min(count, 20), concurrency, actions[name])
            while handlers:  # the server's side of the last ones (not timed: the client side is done)
                await asyncio.wait(set(handlers))
            if name == "tunnels":
                if round_no >= 0:
                    checked = await verify_and_clear()
                else:
                    for s in sides.values():
                        await s.xfrm.flush_sas()
                        await s.xfrm.flush_policies()
                        await s.sa.start()
            if round_no >= 0:
                runs[name].append(seconds)
    server.close()
    raw_server.close()
    for s in sides.values():
        s.sa.close()
        s.xfrm.close()
        s.netns.close()
    summary: dict[str, dict[str, Any]] = {
        name: {"median_s": statistics.median(t), "runs_s": t, "per_s": count / statistics.median(t)}
        for name, t in runs.items()
    }
    return {
        "count": count,
        "concurrency": concurrency,
        "repeat": repeat,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "results": summary,
        "ratio": summary["tunnels"]["per_s"] / summary["raw_tls"]["per_s"],
        "checked": checked,
    }


def report(r: dict[str, Any]) -> str:
    t, raw = r["results"]["tunnels"], r["results"]["raw_tls"]
    return "\n".join(
        [
            f"{r['count']} setups, {r['concurrency']} at a time, median of {r['repeat']} (UML Linux {r['kernel']}):",
            f"  tunnel setups (TLS + exchange + keys + SAs/SPs): {t['per_s']:8.1f}/s  ({t['median_s']:.2f} s)",
            f"  raw TLS 1.3 ECDSA mutual handshakes:            {raw['per_s']:8.1f}/s  ({raw['median_s']:.2f} s)",
            f"  ratio: {r['ratio']:.2f} (target >= 0.50); verified {r['checked']['sas_per_node']} SAs and "
            f"{r['checked']['policies_per_node']} policies per node, keys equal across nodes",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.count <= 250 * 250 or args.concurrency < 1 or args.repeat < 1:
        print("tunnels: --count must be 1..62500, --concurrency and --repeat >= 1", file=sys.stderr)
        return 2
    if args.inside:
        print("RESULT " + json.dumps(asyncio.run(inside(args.count, args.concurrency, args.repeat))))
        return 0
    inner = ["--count", str(args.count), "--concurrency", str(args.concurrency), "--repeat", str(args.repeat)]
    result = run_inside("tunnels", __file__, inner, timeout=1800, mem="2G")
    if result is None:
        return 1
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
