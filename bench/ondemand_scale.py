"""State ∝ traffic (issue 15): zt-bridge --setup on-demand with 200 local and 9,800 remote pods, in UML.

    .venv/bin/python bench/ondemand_scale.py [--local-pods 200] [--remote-pods 9800] [--peers 10]
        [--eager-local 20] [--eager-remote 100] [--sequential 30] [--concurrency 32] [--rekey-pods 10] [--json]

Two boots of user-mode-linux (Linux 6.1, tests/kernel/uml.py), each the real processes: ztd (CA + xDS) with a
mesh config folder (tests/kernel/bridge_guest.py's Guest), and two `zt-bridge` processes, node-a and node-b, in
their own netns, joined by a veth underlay.

- Pods are addresses, not netns: node-a's local pods all live in one netns "podsA" behind one veth to node-a,
  node-b's in "podsB". Each side answers for its whole pod range with one AnyIP route (`local 10.x.0.0/17 dev
  lo`), so a pod is a source address a client binds to (node-a) or a destination a listener accepts on (node-b).
  Every pod is a Pod in the mesh config (its own address, node, service account); the policy is one allow-all
  AuthorizationPolicy in the root namespace. Local pod i runs as service account client-(i % 20), remote pod j as
  server-(j % 98).
- on-demand boot: both bridges `--setup on-demand` (idle reclaim far away: nothing is reclaimed while measuring).
  Each local pod opens one TCP connection (connect + 12-byte echo) to `peers` distinct remote pods, in three
  waves (1/4, 1/4, 1/2 of the local pods) so the state can be read at three numbers of active pairs. The first
  `sequential` pairs go one at a time before the waves (unloaded first-connection latency, each followed by a
  second connection over the tunnel it built); the waves go `concurrency` connections at a time (setup rate).
  Per wave, from the kernel: held packets freed for want of an SA (XfrmOutNoStates of both nodes: the first
  packets a shared trap queue dropped) and TCP segments sent again (TcpRetransSegs of both pods' netns); from
  node-a's bridge, the pairs whose held first packets it gave up on (zt_bridge_held_pairs_given_up_total: their
  pod's queue went at HOLD_MAX before they were up), which tells dropped first packets from merely slow ones.
  Then `rekey-pods` local pods' tunnels are rekeyed (POST /rekey) and the bridges' handshake counters read.
- eager boot: the same mesh shape at a size eager set-up reaches (eager-local x eager-remote, every pair
  admitted), both bridges eager (the default): the time until every pair's SAs are in on both nodes, and the
  same state figures. The state eager mode would hold for the full mesh is projected from the count formula the
  small run checks exactly.
- peers measured in the same boot: mutual TLS 1.3 handshakes (ECDSA P-256, as the bridges' SVIDs) between the
  two node netns, one at a time, before and after the first-connection sample, twice: with Python's ssl module
  (the system's OpenSSL, one self-signed certificate) and with the bridges' own TLS stack (pyOpenSSL on the OpenSSL
  `cryptography` ships, its X25519MLKEM768 key exchange, a CA-signed SVID on each end: guestlib.stack_mtls_ms);
  and the kernel's own release of a held first packet (tests/kernel/guestlib.held_release_ms: a trap holds a SYN,
  an UPDPOLICY puts a policy with an SA in its slot, no bridge involved), 30 times: with a TLS handshake, the
  floor under any first connection here.
- `--strace`: strace -f -c attached to both bridges (every thread) over 3 s of idleness and then over the
  one-at-a-time pairs; each bridge's syscalls per new pair by name, the idle window's rate taken out.

The defaults are the issue's size (about 6 minutes for both boots on a 2-vCPU host; docs/benchmarks.md has a run).

State is read from the kernel (an XFRM dump per node netns: SAs with the bridge's mark, policies by priority),
RSS from /proc/<bridge pid>/status (VmRSS, VmHWM). UML has one CPU shared by ztd, both bridges and the clients,
and slow syscalls: times are functional; the counts and ratios are the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# run as a script, bench/ is sys.path[0]: its xds.py would shadow the generated `xds` protos that ztd imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from bench.inside_uml import run_inside  # noqa: E402

NODE_A_IP, NODE_B_IP = "192.168.50.1", "192.168.50.2"
GATEWAY = {"a": "10.1.255.254", "b": "10.2.255.254"}  # the node's address on its pods' link, outside the pod range
POD_RANGE = {"a": "10.1.0.0/17", "b": "10.2.0.0/17"}  # each side's AnyIP route: up to 32,000 pods
# The node reaches its pods' range through one next hop (an address of the range no pod gets): a route to the
# range on the link itself would make the node resolve every pod address with ARP, and thousands of neighbour
# entries overflow the kernel's table (gc_thresh3, 1,024): the node then drops packets to new pods until its
# garbage collection frees entries, seconds later. A real node has one neighbour per pod's veth.
POD_HOP = {"a": "10.1.127.254", "b": "10.2.127.254"}
CLIENT_ACCOUNTS, SERVER_ACCOUNTS = 20, 98
ECHO_PORT = 8080
PATTERN = bytes.fromhex("5a7e5a7e0ddba11cafe0f00d")
MESH_CIDRS = 1  # --mesh-cidr 10.0.0.0/8: one trap per local pod and mesh CIDR
BLOCKS = 2  # out + fwd mesh -> mesh


def pod_ip(node: str, i: int) -> str:
    """Pod i of node a (10.1/16) or b (10.2/16): 10.<n>.<i // 250>.<i % 250 + 1>."""
    hi, lo = divmod(i, 250)
    return f"10.{1 if node == 'a' else 2}.{hi}.{lo + 1}"


def peers_of(i: int, peers: int, remote: int) -> list[int]:
    """The `peers` distinct remote pods local pod i talks to: spread over the whole remote range."""
    stride = max(1, remote // peers)
    return [(i * 7 + k * stride) % remote for k in range(peers)]


def eager_projection(local: int, remote: int) -> dict[str, int]:
    """What node-a holds with eager set-up and an allow-all policy: every pair a tunnel (tunnel_scale's formula)."""
    pairs = local * remote
    return {"pairs": pairs, "sas": 2 * pairs, "policies": BLOCKS + 2 * local + 3 * pairs}


def ondemand_expected(local: int, active: int) -> dict[str, int]:
    """What node-a holds on demand: per active pair 2 SAs + 3 policies, per local pod a bypass pair and a trap."""
    return {"sas": 2 * active, "policies": BLOCKS + (2 + MESH_CIDRS) * local + 3 * active}


def mesh_yaml(local: int, remote: int) -> str:
    """The mesh config: nodes, bridge pods, `local` pods on node-a, `remote` on node-b, one allow-all policy."""
    accounts = [f"client-{k}" for k in range(CLIENT_ACCOUNTS)] + [f"server-{k}" for k in range(SERVER_ACCOUNTS)]
    items = [
        "  - {apiVersion: v1, kind: Namespace, metadata: {name: istio-system}}",
        "  - {apiVersion: v1, kind: Namespace, metadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}}",
        "  - {apiVersion: v1, kind: ServiceAccount, metadata: {name: ztunnel, namespace: istio-system}}",
        *(f"  - {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: {a}, namespace: apps}}}}" for a in accounts),
    ]
    for node, ip in (("node-a", NODE_A_IP), ("node-b", NODE_B_IP)):
        items.append(f"  - {{apiVersion: v1, kind: Node, metadata: {{name: {node}}}, "
                     f"status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}}}")  # fmt: skip
        items.append(_pod(f"zt-bridge-{node}", "istio-system", "ztunnel", node, ip, host=True))
    for i in range(local):
        items.append(_pod(f"client-{i}", "apps", f"client-{i % CLIENT_ACCOUNTS}", "node-a", pod_ip("a", i)))
    for j in range(remote):
        items.append(_pod(f"server-{j}", "apps", f"server-{j % SERVER_ACCOUNTS}", "node-b", pod_ip("b", j)))
    return "apiVersion: v1\nkind: List\nitems:\n" + "\n".join(items) + "\n"


def _pod(name: str, ns: str, sa: str, node: str, ip: str, host: bool = False) -> str:
    return (
        f"  - {{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: {ns}, labels: {{app: {sa}}}}}, "
        f"spec: {{serviceAccountName: {sa}, nodeName: {node}, hostNetwork: {'true' if host else 'false'}, "
        f"containers: [{{name: main, image: example.com/{sa}:1}}]}}, status: {{phase: Running, podIP: {ip}}}}}"
    )


ALLOW_ALL = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: istio-system}
spec:
  action: ALLOW
  rules: [{}]
"""


def kernel_hz() -> int | None:
    """The running kernel's CONFIG_HZ (the tick sets when Linux lets a held first packet go), from /proc/config.gz."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return next((int(x.split("=")[1]) for x in f if x.startswith("CONFIG_HZ=")), None)
    except OSError:
        return None


def spread(values: list[float]) -> dict[str, float]:
    """Median, p90 and max (ms), and how many."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"n": len(ordered), "median": round(statistics.median(ordered), 2), "p90": round(p90, 2),
            "max": round(ordered[-1], 2), "min": round(ordered[0], 2)}  # fmt: skip


# ================================================================================================================
# guest side (inside UML, as root)

ECHO_SERVER = """
import asyncio, sys
async def echo(r, w):
    try:
        w.write(await r.read(100)); await w.drain()
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=1024)
    print("ready", flush=True)
    await s.serve_forever()
asyncio.run(main())
"""

# One client process for many pairs: `concurrency` at a time, each: bind the local pod's address, connect, echo.
# Prints one JSON line: per pair [start offset s, connect ms or -1, error].
CLIENT = """
import asyncio, json, socket, sys, time
spec = json.loads(sys.argv[1]); pattern = bytes.fromhex(spec["pattern"])
async def one(src, dst, t0):
    start = time.perf_counter()
    s = socket.socket(); s.setblocking(False); s.bind((src, 0))
    try:
        async with asyncio.timeout(spec["timeout"]):
            await asyncio.get_running_loop().sock_connect(s, (dst, spec["port"]))
            ms = (time.perf_counter() - start) * 1000
            r, w = await asyncio.open_connection(sock=s)
            w.write(pattern); await w.drain()
            echo = await r.readexactly(len(pattern)); w.close()
        return [round(start - t0, 4), round(ms, 2), "" if echo == pattern else "mismatch"]
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
        s.close()
        return [round(start - t0, 4), -1, type(err).__name__ + ": " + str(err)]
async def main():
    sem = asyncio.Semaphore(spec["concurrency"]); t0 = time.perf_counter()
    async def gated(p):
        async with sem:
            return await one(p[0], p[1], t0)
    out = await asyncio.gather(*(gated(p) for p in spec["pairs"]))
    print(json.dumps({"results": out, "wall": time.perf_counter() - t0}))
asyncio.run(main())
"""


def guest_classes() -> type:
    """The guest's story class (imports that only exist in the guest's run: pytest via bridge_guest, aiohttp)."""
    from tests.kernel.bridge_guest import ADMIN, Guest, ns, sh

    class ScaleGuest(Guest):
        def __init__(self, mode: str, opts: dict[str, int]) -> None:
            super().__init__()
            self.mode, self.opts = mode, opts
            self.local = opts["eager_local"] if mode == "eager" else opts["local"]
            self.remote = opts["eager_remote"] if mode == "eager" else opts["remote"]

        # --- set-up ---------------------------------------------------------------------------------------

        async def topology(self) -> None:
            lines: list[str] = []
            for name in ("nodeA", "nodeB", "podsA", "podsB"):
                await sh("ip", "netns", "add", name)
                lines.append(f"-n {name} link set lo up")
            lines += ["link add eth0 netns nodeA type veth peer eth0 netns nodeB"]
            for node, addr in (("nodeA", NODE_A_IP), ("nodeB", NODE_B_IP)):
                lines += [f"-n {node} addr add {addr}/24 dev eth0", f"-n {node} link set eth0 up"]
            for side, node, pods, other in (("a", "nodeA", "podsA", "b"), ("b", "nodeB", "podsB", "a")):
                gw = GATEWAY[side]
                lines += [
                    f"link add eth0 netns {pods} type veth peer vpods netns {node}",
                    f"-n {node} addr add {gw}/32 dev vpods", f"-n {node} link set vpods up",
                    f"-n {node} route add {POD_RANGE[side]} via {POD_HOP[side]} dev vpods onlink",
                    f"-n {node} route add {POD_RANGE[other]} via {NODE_A_IP if other == 'a' else NODE_B_IP}",
                    f"-n {pods} link set eth0 up", f"-n {pods} route add {gw} dev eth0",
                    f"-n {pods} route add default via {gw} dev eth0",
                    # AnyIP: every address of the side's pod range is local to its pods' netns
                    f"-n {pods} route add local {POD_RANGE[side]} dev lo",
                ]  # fmt: skip
            for line in lines:  # a few dozen; `ip -batch` takes no -n per line
                await sh("ip", *line.split())
            for netns in ("nodeA", "nodeB", "podsA", "podsB"):
                await sh(*ns(netns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                             "net.ipv4.conf.default.rp_filter=0", "net.ipv4.tcp_syn_retries=6"))  # fmt: skip

        async def start_ztd(self) -> None:
            from xds_server.main import Ztd, ZtdConfig

            self.mesh = Path("/run/mesh")
            self.mesh.mkdir(parents=True, exist_ok=True)
            text = mesh_yaml(self.local, self.remote)
            await asyncio.to_thread((self.mesh / "mesh.yaml").write_text, text)
            await asyncio.to_thread((self.mesh / "policies.yaml").write_text, ALLOW_ALL)
            cfg = ZtdConfig(listen_address="127.0.0.1", xds_port=15010, secure_port=15012, monitoring_port=15014,
                            state_dir=Path("/run/ztd"), config_dir=self.mesh)  # fmt: skip
            self.ztd_cfg = cfg
            self.ztd = Ztd(cfg)
            self.ztd_stop = asyncio.Event()
            self.ztd_task = asyncio.create_task(self.ztd.run(self.ztd_stop))
            await asyncio.wait_for(self.ztd.ready.wait(), 600)

        async def run(self, scenario: str) -> dict[str, Any]:
            import aiohttp

            await self.topology()
            watch = asyncio.create_task(self.progress())
            started = time.monotonic()
            await self.start_ztd()
            self.facts["ztd_start_seconds"] = round(time.monotonic() - started, 1)
            self.facts["mesh"] = {"local": self.local, "remote": self.remote}
            async with aiohttp.ClientSession() as self.http:
                try:
                    await (self.eager() if self.mode == "eager" else self.ondemand())
                finally:
                    watch.cancel()
                    await self.stop()
            return self.facts

        async def progress(self) -> None:
            """Every 10 s on stderr: the resident sets, so a run that dies of memory still says who grew."""
            started = time.monotonic()
            while True:
                rss = {"guest+ztd": self.rss_of("self").get("VmRSS")}
                for name, proc in list(self.procs.items()):
                    with contextlib.suppress(OSError):
                        rss[name] = self.rss_of(str(proc.pid)).get("VmRSS")
                print(f"progress {time.monotonic() - started:.0f}s RSS MiB {rss}", file=sys.stderr, flush=True)
                await asyncio.sleep(10)

        async def stop(self) -> None:
            import signal

            for proc in self.procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs.values():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 30)
            self.ztd_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ztd_task, 30)

        async def start_bridges(self, *extra: str) -> float:
            """Both bridges, until each has the whole mesh in its view (seconds from launch)."""
            started = time.monotonic()
            await asyncio.gather(self.start_bridge("a", "node-a", "nodeA", *extra),
                                 self.start_bridge("b", "node-b", "nodeB", *extra))  # fmt: skip
            want = self.local + self.remote  # the bridges (host network) are not mesh pods
            await poll(lambda: self.mesh_pods(want), 600)
            return time.monotonic() - started

        async def mesh_pods(self, want: int) -> bool:
            return all([int((await self.dump(n))["state"]["mesh_pods"]) >= want for n in ("a", "b")])

        # --- probes ---------------------------------------------------------------------------------------

        async def state(self, netns: str) -> dict[str, int]:
            """The node's XFRM state from the kernel: keyed SAs of the bridge, policies by role (priority)."""
            from ipsec_bridge.sa_manager import (
                BLOCK_PRIORITY,
                BRIDGE_MARK,
                BYPASS_PRIORITY,
                FLOW_HOLD_PRIORITY,
                PAIR_PRIORITY,
                PAIR_TRAP_PRIORITY,
                RELEASED_HOLD_PRIORITY,
                TRAP_PRIORITY,
            )
            from ipsec_bridge.xfrm.netlink import XfrmSocket

            async with await XfrmSocket.open(netns) as sock:
                sas = await sock.list_sas()
                pols = await sock.list_policies()
            roles = {PAIR_PRIORITY: "pair", BYPASS_PRIORITY: "bypass", TRAP_PRIORITY: "trap", BLOCK_PRIORITY: "block"}
            # on-demand holds of ACQUIREs in flight (transient: a pair's trap until it is up, a flow's for ~2 s)
            roles |= dict.fromkeys((PAIR_TRAP_PRIORITY, FLOW_HOLD_PRIORITY, RELEASED_HOLD_PRIORITY), "hold")
            out = {"sas": len([i for i in sas if i.sa.mark == BRIDGE_MARK and i.sa.aead is not None]),
                   "sas_all": len(sas), "policies": len(pols)}  # fmt: skip
            for p in pols:
                role = roles.get(p.policy.priority, "other")
                out[f"pol_{role}"] = out.get(f"pol_{role}", 0) + 1
            return out

        def rss(self, name: str) -> dict[str, float]:
            """The bridge process's resident set (MiB), now and its peak."""
            return self.rss_of(str(self.procs[name].pid))

        def cpu_ms(self) -> dict[str, float]:
            """Each bridge's CPU time so far (user + system, ms; clock ticks of /proc/<pid>/stat), and its minor page
            faults as `<name>_faults` (each one a trap through the host in UML, as a syscall is)."""
            tick = os.sysconf("SC_CLK_TCK")
            out = {}
            for name in ("a", "b"):
                fields = Path(f"/proc/{self.procs[name].pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) * 1000 / tick  # utime, stime
                out[f"{name}_faults"] = int(fields[7])  # minflt
            return out

        async def strace_start(self) -> dict[str, tuple[asyncio.subprocess.Process, Path, float]]:
            """`--strace`: strace -f -c attached to both bridges (every thread)."""
            tracers = {}
            for name in ("a", "b"):
                out = Path(f"/run/strace-{name}.txt")
                proc = await asyncio.create_subprocess_exec(
                    "strace", "-f", "-c", "-qq", "-o", str(out), "-p", str(self.procs[name].pid),
                    stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
                tracers[name] = (proc, out, time.monotonic())
            await asyncio.sleep(1)  # attached to every thread before anything is measured
            return tracers

        @staticmethod
        async def strace_stop(tracers: dict[str, tuple[asyncio.subprocess.Process, Path, float]]
                              ) -> dict[str, tuple[float, dict[str, int]]]:  # fmt: skip
            """Each bridge's traced seconds and its syscalls by name, from strace's summary."""
            out = {}
            for name, (proc, path, t0) in tracers.items():
                proc.send_signal(2)
                await proc.wait()
                counts: dict[str, int] = {}
                for row in path.read_text().splitlines():
                    cols = row.split()
                    if len(cols) >= 5 and cols[-1].isidentifier() and cols[3].isdigit():
                        counts[cols[-1]] = int(cols[3])  # the last row: "total"
                out[name] = (time.monotonic() - t0, counts)
            return out

        @staticmethod
        def per_pair(idle: dict[str, tuple[float, dict[str, int]]], busy: dict[str, tuple[float, dict[str, int]]],
                     pairs: int) -> dict[str, dict[str, float]]:  # fmt: skip
            """Syscalls per new pair by name: the busy window's, less what the idle window's rate makes in it."""
            out = {}
            for name, (seconds, counts) in busy.items():
                idle_s, idle_counts = idle[name]
                net = {k: round((v - idle_counts.get(k, 0) * seconds / idle_s) / max(1, pairs), 1)
                       for k, v in counts.items()}  # fmt: skip
                out[f"syscalls_{name}_per_pair"] = dict(sorted(net.items(), key=lambda kv: -kv[1]))
                out[f"syscalls_{name}_idle_per_s"] = round(idle_counts.get("total", 0) / idle_s, 1)
            return out

        @staticmethod
        def rss_of(pid: str) -> dict[str, float]:
            fields = {}
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = round(int(value.split()[0]) / 1024, 1)
            return fields

        async def snapshot(self, label: str, active: int) -> dict[str, Any]:
            snap: dict[str, Any] = {"label": label, "active_pairs": active}
            for name, netns in (("a", "nodeA"), ("b", "nodeB")):
                snap[name] = {**await self.state(netns), **self.rss(name)}
                dump = await self.dump(name)
                snap[name]["tunnels"] = len(dump["tunnels"])
                snap[name]["scheduler"] = dump.get("scheduler", {})  # passes so far, and their CPU seconds
            snap["ztd_rss_mib"] = self.rss_of("self")["VmRSS"]  # ztd runs in this (the guest's) process
            return snap

        async def counters(self, name: str) -> dict[str, int]:
            """Successful handshakes by kind/mode and the signatures they made; rekeys completed."""
            out: dict[str, int] = {}
            for key, value in (await self.raw_metrics(name)).items():
                if key.startswith(("zt_bridge_handshake_modes_total{", "zt_bridge_handshake_signatures_total{")):
                    kind = "rekey" if 'kind="rekey"' in key else "new"
                    mode = "resumed" if 'mode="resumed"' in key else "full"
                    what = "sig" if "signatures" in key else "hs"
                    out[f"{what}_{kind}_{mode}"] = out.get(f"{what}_{kind}_{mode}", 0) + int(value)
                elif key.startswith("zt_bridge_rekeys_total{"):
                    out["rekeys"] = out.get("rekeys", 0) + int(value)
                elif key.startswith("zt_bridge_acquires_total{"):
                    result = key.split('result="', 1)[1].split('"', 1)[0]
                    out[f"acq_{result}"] = int(value)
                elif key == "zt_bridge_held_pairs_given_up_total":
                    out["given_up"] = int(value)
            return out

        async def kernel_counters(self) -> dict[str, int]:
            """XfrmOutNoStates of both nodes, TcpRetransSegs of both pod netns (all counters are per netns)."""
            out = {}
            for side, node, pods in (("a", "nodeA", "podsA"), ("b", "nodeB", "podsB")):
                stat = await sh(*ns(node, "cat", "/proc/net/xfrm_stat"))
                out[f"held_freed_{side}"] = next(int(x.split()[1]) for x in stat.splitlines()
                                                 if x.startswith("XfrmOutNoStates"))  # fmt: skip
                rows = [x.split() for x in (await sh(*ns(pods, "cat", "/proc/net/snmp"))).splitlines()
                        if x.startswith("Tcp:")]  # fmt: skip
                out[f"tcp_resent_{side}"] = int(dict(zip(rows[0], rows[1], strict=True))["RetransSegs"])
            # the kernel's ARP table is shared by every netns: if it fills, packets to new pods are dropped with
            # no XFRM or SNMP counter (see POD_HOP); the report says so rather than blaming the bridges
            rows = [x.split() for x in (await sh("cat", "/proc/net/stat/arp_cache")).splitlines()]
            col = rows[0].index("table_fulls")
            out["neigh_table_fulls"] = sum(int(r[col], 16) for r in rows[1:])
            return out

        async def fast_open(self) -> dict[str, int]:
            """TCP Fast Open counters of both nodes' netns (the bridges' handshake connections)."""
            from tests.kernel.guestlib import fast_open_counters

            a, b = await fast_open_counters("nodeA"), await fast_open_counters("nodeB")
            return {**{f"a_{k}": v for k, v in a.items()}, **{f"b_{k}": v for k, v in b.items()}}

        async def traps_in(self) -> bool:
            a, b = await self.state("nodeA"), await self.state("nodeB")
            return a.get("pol_trap", 0) >= self.local and b.get("pol_trap", 0) >= self.remote

        async def rekeyed(self, total: int) -> bool:
            return (await self.counters("a")).get("rekeys", 0) >= total

        async def serve_echo(self) -> asyncio.subprocess.Process:
            proc = await asyncio.create_subprocess_exec(
                *ns("podsB", sys.executable, "-S", "-c", ECHO_SERVER, str(ECHO_PORT)), stdout=asyncio.subprocess.PIPE
            )
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"echo server: {line!r}")
            self.procs["echo"] = proc
            return proc

        async def connect(self, pairs: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
            spec = {"pairs": pairs, "concurrency": concurrency, "port": ECHO_PORT, "timeout": 60,
                    "pattern": PATTERN.hex()}  # fmt: skip
            out = await sh(*ns("podsA", sys.executable, "-S", "-c", CLIENT, json.dumps(spec)))
            done: dict[str, Any] = json.loads(out)
            return done

        async def raw_tls(self, count: int) -> list[float]:
            """Mutual TLS 1.3 handshakes nodeA -> nodeB (tests/kernel/guestlib.raw_mtls_ms)."""
            from tests.kernel.guestlib import raw_mtls_ms

            return await raw_mtls_ms("nodeA", "nodeB", NODE_B_IP, count, Path("/run"))

        async def stack_tls(self, count: int) -> list[float]:
            """The same with the bridges' TLS stack and SVID chains (tests/kernel/guestlib.stack_mtls_ms)."""
            from tests.kernel.guestlib import stack_mtls_ms

            return await stack_mtls_ms("nodeA", "nodeB", NODE_B_IP, count, Path("/run"))

        async def wait_tunnels(self, want: int, seconds: float) -> float:
            """Until node-a and node-b both hold `want` keyed tunnels' SAs (2 each); when (monotonic)."""
            async with asyncio.timeout(seconds):
                while True:
                    a, b = await self.state("nodeA"), await self.state("nodeB")
                    if a["sas"] >= 2 * want and b["sas"] >= 2 * want:
                        return time.monotonic()
                    await asyncio.sleep(2)  # two dumps of thousands of objects: not too often on one CPU

        # --- the runs -------------------------------------------------------------------------------------

        async def ondemand(self) -> None:
            from tests.kernel.guestlib import counters_moved

            f, o = self.facts, self.opts
            f["bridges_sync_seconds"] = round(await self.start_bridges("--setup", "on-demand", "--idle-timeout",
                                                                       "86400s"), 1)  # fmt: skip
            # the first reconcile evaluates the mesh before the traps go in: until then a packet meets the block
            t0 = time.monotonic()
            await poll(lambda: self.traps_in(), 600)
            f["traps_in_seconds"] = round(time.monotonic() - t0, 1)
            await self.serve_echo()
            snaps = [await self.snapshot("traps in, no traffic", 0)]
            all_pairs = [(pod_ip("a", i), pod_ip("b", j)) for i in range(self.local)
                         for j in peers_of(i, o["peers"], self.remote)]  # fmt: skip
            assert len(set(all_pairs)) == len(all_pairs), "peers must be distinct"
            c0 = {n: await self.counters(n) for n in ("a", "b")}

            # unloaded first connections, between two raw TLS samples
            seq = all_pairs[: o["sequential"]]
            tls_before, stack_before = await self.raw_tls(15), await self.stack_tls(15)
            tracers = await self.strace_start() if o.get("strace") else {}
            idle0, t_idle = self.cpu_ms(), time.monotonic()
            await asyncio.sleep(3)
            idle1, t_idle = self.cpu_ms(), time.monotonic() - t_idle
            if tracers:
                idle_calls = await self.strace_stop(tracers)
                tracers = await self.strace_start()
            fo0, cpu0, t_seq = await self.fast_open(), self.cpu_ms(), time.monotonic()
            firsts: list[float] = []
            seconds: list[float] = []
            errors: list[str] = []
            for pair in seq:
                done = (await self.connect([pair, pair], 1))["results"]  # the first builds the tunnel
                for (_, ms, err), sink in zip(done, (firsts, seconds), strict=True):
                    if ms >= 0 and not err:
                        sink.append(ms)
                    else:
                        errors.append(err)
            fo1, cpu1, t_seq = await self.fast_open(), self.cpu_ms(), time.monotonic() - t_seq
            syscalls = self.per_pair(idle_calls, await self.strace_stop(tracers), len(seq)) if tracers else {}
            # what each bridge spent per new pair (its handshake, the ACQUIRE, the switch), its idle work taken out
            cpu = {}
            for n in ("a", "b"):
                idle_rate = (idle1[n] - idle0[n]) / t_idle
                cpu[f"cpu_{n}_idle_ms_per_s"] = round(idle_rate, 2)
                cpu[f"cpu_{n}_ms_per_pair"] = round((cpu1[n] - cpu0[n] - idle_rate * t_seq) / max(1, len(seq)), 2)
                cpu[f"faults_{n}_per_pair"] = round((cpu1[f"{n}_faults"] - cpu0[f"{n}_faults"]) / max(1, len(seq)))
            tls_after, stack_after = await self.raw_tls(15), await self.stack_tls(15)
            # the kernel's own share of every first connection: releasing the held SYN once its policy is in
            from tests.kernel.guestlib import held_release_ms

            release = await held_release_ms(30)
            # of each first connection, what its handshake took on either bridge (the exchange and the policy
            # switch, Generation.handshake_seconds): the rest is the ACQUIRE, the scheduling and the release
            hs_ms = {}
            for side in ("a", "b"):
                rows = {(r["local_address"], r["peer_address"]): r for r in (await self.dump(side))["tunnels"]}
                keys = seq if side == "a" else [(b, a) for a, b in seq]
                hs_ms[f"handshake_{side}_ms"] = spread([rows[k]["handshake_ms"] for k in keys if k in rows])
            f["latency"] = {"first_ms": spread(firsts), "second_ms": spread(seconds), "errors": errors, **hs_ms,
                            "tls_before_ms": spread(tls_before), "tls_after_ms": spread(tls_after),
                            "tls_ms": spread(tls_before + tls_after), "first_all": firsts,
                            "tls_stack_ms": spread(stack_before + stack_after),
                            "kernel_release_ms": spread([x for x in release if x >= 0]), **syscalls,
                            "kernel_release_failed": sum(1 for x in release if x < 0),
                            "kernel_hz": await asyncio.to_thread(kernel_hz),
                            "fast_open": counters_moved(fo0, fo1), **cpu}  # fmt: skip

            # the waves: 1/4, 1/4, 1/2 of the local pods, `concurrency` connections at a time
            cuts = [self.local // 4, self.local // 2, self.local]
            waves: list[dict[str, Any]] = []
            lo = 0
            for cut in cuts:
                batch = [p for p in all_pairs[lo * o["peers"] : cut * o["peers"]] if p not in seq]
                active = cut * o["peers"]
                k0 = await self.kernel_counters()
                g0 = (await self.counters("a")).get("given_up", 0)
                t0 = time.monotonic()
                done = await self.connect(batch, o["concurrency"])
                up = await self.wait_tunnels(active, 300)
                ok = [r[1] for r in done["results"] if r[1] >= 0 and not r[2]]
                k1 = await self.kernel_counters()
                given_up = (await self.counters("a")).get("given_up", 0) - g0
                waves.append({
                    "pairs": len(batch), "active_after": active, "connected": len(ok),
                    "errors": sorted({r[2] for r in done["results"] if r[2]})[:5],
                    # every pair carried its echo both ways when the clients finish: the set-up time
                    "clients_wall_s": round(done["wall"], 2), "kernel_check_s": round(up - t0, 2),
                    "tunnels_per_s": round(len(batch) / done["wall"], 1), "connect_ms": spread(ok),
                    # a SYN sent again (TCP's 1 s initial RTO): dropped, or held longer than that
                    "retransmitted": sum(1 for ms in ok if ms >= 1000),
                    # (local pod, remote pod, start offset s, connect ms): what to look up in the bridges' logs
                    "slowest": slowest(batch, done["results"]),
                    # exact: held packets the kernel freed for want of an SA (XfrmOutNoStates, both nodes), and
                    # TCP segments the clients' and servers' netns sent again (TcpRetransSegs)
                    **counters_moved(k0, k1),
                    # pairs whose held first packets node-a let go before they were up (HOLD_MAX passed)
                    "given_up_a": given_up,
                })  # fmt: skip
                snaps.append(await self.snapshot(f"after wave {len(waves)}", active))
                lo = cut
            f["waves"] = waves
            c1 = {n: await self.counters(n) for n in ("a", "b")}
            f["setup_counters"] = {n: counters_moved(c0[n], c1[n]) for n in ("a", "b")}

            # rekey a sample: every tunnel of `rekey_pods` local pods (POST /rekey on node-a, the initiator)
            chosen = list(range(0, self.local, max(1, self.local // o["rekey_pods"])))[: o["rekey_pods"]]
            sample = [pod_ip("a", i) for i in chosen]
            want = len(sample) * o["peers"]
            # tickets are kept per (peer bridge, local identity, peer identity): how many such keys the sample has
            idents = {(i % CLIENT_ACCOUNTS, j % SERVER_ACCOUNTS) for i in chosen
                      for j in peers_of(i, o["peers"], self.remote)}  # fmt: skip
            r0 = {n: await self.counters(n) for n in ("a", "b")}
            t0 = time.monotonic()
            asked = 0
            for local in sample:
                async with self.http.post(f"http://127.0.0.1:{ADMIN['a']}/rekey", params={"local": local}) as resp:
                    asked += int((await resp.json())["rekeyed"])
            await poll(lambda: self.rekeyed(r0["a"].get("rekeys", 0) + want), 300)
            rekey_s = time.monotonic() - t0
            await asyncio.sleep(1)  # the responder's counters of the last ones
            r1 = {n: await self.counters(n) for n in ("a", "b")}
            f["rekey"] = {"asked": asked, "wanted": want, "seconds": round(rekey_s, 2),
                          "identity_pairs": len(idents),
                          "counters": {n: counters_moved(r0[n], r1[n]) for n in ("a", "b")},
                          "resumption": (await self.dump("a")).get("resumption")}  # fmt: skip
            snaps.append(await self.snapshot("after the rekeys (old generations retired)", len(all_pairs)))
            f["snapshots"] = snaps
            f["expected"] = {str(s["active_pairs"]): ondemand_expected(self.local, s["active_pairs"]) for s in snaps}
            f["eager_projection"] = eager_projection(self.local, self.remote)

        async def eager(self) -> None:
            f = self.facts
            pairs = self.local * self.remote
            f["bridges_sync_seconds"] = round(await self.start_bridges(), 1)
            t0 = time.monotonic()  # both have the mesh: set-up is under way (polled every 0.5 s from here)
            up = await self.wait_tunnels(pairs, 1800)
            f["all_up_s"] = round(up - t0, 2)
            f["tunnels_per_s"] = round(pairs / (up - t0), 1)
            await self.serve_echo()
            sample = [(pod_ip("a", i), pod_ip("b", j)) for i in range(self.local) for j in range(0, self.remote, 25)]
            done = await self.connect(sample[:30], 1)
            f["warm_connect_ms"] = spread([r[1] for r in done["results"] if r[1] >= 0 and not r[2]])
            f["tls_ms"] = spread(await self.raw_tls(15))
            f["counters"] = {n: await self.counters(n) for n in ("a", "b")}
            f["snapshot"] = await self.snapshot("eager: every admitted pair up", pairs)
            f["expected"] = eager_projection(self.local, self.remote)

    return ScaleGuest


async def poll(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    """Until `check()` holds (TimeoutError after `seconds`)."""
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.5)


def slowest(pairs: list[tuple[str, str]], results: list[list[Any]], n: int = 5) -> list[list[Any]]:
    """The `n` slowest connections as (local pod, remote pod, start offset s, connect ms): to find in the logs."""
    return sorted(([*p, r[0], r[1]] for p, r in zip(pairs, results, strict=True)), key=lambda x: -x[3])[:n]


def inside(mode: str, opts: dict[str, int]) -> int:
    os.environ.setdefault("TMPDIR", "/run")
    guest = guest_classes()(mode, opts)
    facts = asyncio.run(guest.run(mode))
    for name in ("a", "b"):
        log = Path(f"/run/bridge-{name}.log")
        if log.exists():
            warnings = [x for x in log.read_text().splitlines() if "WARNING" in x or "ERROR" in x]
            facts.setdefault("log_warnings", {})[name] = {"count": len(warnings), "last": warnings[-3:]}
    print("RESULT " + json.dumps(facts, default=str))
    return 0


# ================================================================================================================
# host side: report


def report(od: dict[str, Any], eg: dict[str, Any]) -> str:
    local, remote = od["mesh"]["local"], od["mesh"]["remote"]
    lat = od["latency"]
    snaps = od["snapshots"]
    lines = [
        f"on demand: {local} local x {remote:,} remote pods ({local * remote:,} admitted pairs), allow-all;"
        f" ztd up in {od['ztd_start_seconds']} s, both bridges synced in {od['bridges_sync_seconds']} s, their traps in"
        f" {od.get('traps_in_seconds')} s later",
        "  state per node, read from the kernel (keyed SAs / policies: pair+bypass+trap+block) and bridge RSS:",
        f"  {'':44} {'node-a SAs':>10} {'policies':>9} {'RSS MiB':>8} {'peak':>6} | {'node-b SAs':>10}"
        f" {'policies':>9} {'RSS MiB':>8} {'peak':>6}",
    ]
    for s in snaps:
        a, b = s["a"], s["b"]
        lines.append(
            f"  {s['label'][:30]:30} {s['active_pairs']:>7,} pairs {a['sas']:>10,} {a['policies']:>9,}"
            f" {a['VmRSS']:>8} {a['VmHWM']:>6} | {b['sas']:>10,} {b['policies']:>9,} {b['VmRSS']:>8} {b['VmHWM']:>6}"
        )
    exp = od["expected"]
    expected = ", ".join(f"{int(k):,} pairs -> {v['sas']:,} SAs/{v['policies']:,} pol" for k, v in exp.items())
    lines.append(f"  expected on node-a (2 SAs + 3 policies per active pair, 3 per local pod, 2 blocks): {expected}")
    proj = od["eager_projection"]
    last = snaps[-2] if len(snaps) > 1 else snaps[-1]
    lines.append(
        f"  eager, same mesh (projected): {proj['pairs']:,} tunnels, {proj['sas']:,} SAs + {proj['policies']:,}"
        f" policies on node-a = {proj['sas'] / max(1, last['a']['sas']):,.0f}x the SAs on demand holds for"
        f" {last['active_pairs']:,} active pairs"
    )
    for k, w in enumerate(od["waves"], 1):
        lines.append(
            f"  wave {k}: {w['pairs']:,} new pairs -> all connected in {w['clients_wall_s']} s = {w['tunnels_per_s']}"
            f" tunnels/s ({w['connected']:,} connected; connect ms under load: median {w['connect_ms'].get('median')},"
            f" p90 {w['connect_ms'].get('p90')}, max {w['connect_ms'].get('max')}; {w['retransmitted']} took >= 1 s;"
            f" TCP segments resent {w.get('tcp_resent_a', 0)} + {w.get('tcp_resent_b', 0)}, held packets freed"
            f" {w.get('held_freed_a', 0)} + {w.get('held_freed_b', 0)}, pairs node-a gave up holding for"
            f" {w.get('given_up_a', 0)}){' errors: ' if w['errors'] else ''}"
            f"{'; '.join(w['errors'])}"
        )
    fulls = sum(w.get("neigh_table_fulls", 0) for w in od["waves"])
    if fulls:
        lines.append(
            f"  WARNING: the guest's neighbour table overflowed {fulls} times during the waves: packets to new pods"
            " were dropped by the bench's topology, so the waves' tails are not the bridges'"
        )
    fm, tl = lat["first_ms"], lat["tls_ms"]
    lines.append(
        f"  first connection, one at a time ({fm['n']}): median {fm.get('median')} ms, p90 {fm.get('p90')}, max"
        f" {fm.get('max')}; beside mutual TLS 1.3 in the same boot: median {tl.get('median')} ms (p90 {tl.get('p90')})"
        f" -> {fm.get('median', 0) / max(tl.get('median', 1), 1e-9):.1f}x; second connection over the tunnel:"
        f" median {lat['second_ms'].get('median')} ms"
    )
    ts = lat.get("tls_stack_ms", {})
    if ts:
        lines.append(
            f"  the same handshake with the bridges' TLS stack (pyOpenSSL on cryptography's OpenSSL, X25519MLKEM768,"
            f" SVID chains): median {ts.get('median')} ms (p90 {ts.get('p90')}) -> first connection"
            f" {fm.get('median', 0) / max(ts.get('median', 1), 1e-9):.1f}x"
        )
    fo = lat.get("fast_open", {})
    if fo:  # --tcp-fast-open (off by default)
        lines.append(
            f"  handshake connections with TCP Fast Open: node-a sent {fo.get('a_Active', 0)} SYNs with data"
            f" ({fo.get('a_ActiveFail', 0)} fell back), node-b took {fo.get('b_Passive', 0)}"
            f" ({fo.get('b_PassiveFail', 0)} refused, {fo.get('b_CookieReqd', 0)} cookies asked for)"
        )
    lines.append(
        f"  guest CPU per new pair (idle work taken out; UML bills the host's steal to whoever runs): node-a"
        f" {lat.get('cpu_a_ms_per_pair')} ms, node-b {lat.get('cpu_b_ms_per_pair')} ms; idle: node-a"
        f" {lat.get('cpu_a_idle_ms_per_s')} ms/s, node-b {lat.get('cpu_b_idle_ms_per_s')} ms/s; minor page faults"
        f" per pair: node-a {lat.get('faults_a_per_pair')}, node-b {lat.get('faults_b_per_pair')}"
    )
    kr = lat.get("kernel_release_ms", {})
    if kr:
        floor = kr.get("median", 0) + tl.get("median", 0)
        ratio = floor / max(tl.get("median", 1), 1e-9)
        lines.append(
            f"  the kernel's release of a held first packet (UPDPOLICY over its trap -> connect done, no bridge):"
            f" median {kr.get('median')} ms (min {kr.get('min')}, max {kr.get('max')}; the queue runs at the next"
            f" tick, HZ={lat.get('kernel_hz')}); with one TLS handshake: {floor:.1f} ms = {ratio:.1f}x,"
            f" the floor under the first connection here; {lat.get('kernel_release_failed', 0)} failed"
        )
    sc = od["setup_counters"]["a"]
    acquires = ", ".join(f"{k[4:]} {v}" for k, v in sc.items() if k.startswith("acq_"))
    lines.append(f"  set-up on node-a: {sc.get('hs_new_full', 0):,} full handshakes, {sc.get('hs_new_resumed', 0):,}"
                 f" resumed (a ticket of the same identity pair), {sc.get('sig_new_full', 0):,} signatures;"
                 f" ACQUIREs: {acquires}")  # fmt: skip
    rk = od["rekey"]
    for n in ("a", "b"):
        c = rk["counters"][n]
        res, full = c.get("hs_rekey_resumed", 0), c.get("hs_rekey_full", 0)
        sig_r, sig_f = c.get("sig_rekey_resumed", 0), c.get("sig_rekey_full", 0)
        lines.append(
            f"  rekey of {rk['wanted']} tunnels ({rk['identity_pairs']} identity pairs) on node-{n}: {res} resumed with"
            f" {sig_r} signatures, {full} full with {sig_f}; {(sig_r + sig_f) / max(1, res + full):.2f} signatures per"
            f" rekey; {rk['seconds']} s"
        )
    es = eg["snapshot"]
    ep = eg["expected"]
    lines += [
        f"eager (peer): {eg['mesh']['local']} x {eg['mesh']['remote']} pods = {ep['pairs']:,} pairs, every one set up"
        f" at start: all up {eg['all_up_s']} s after both synced = {eg['tunnels_per_s']} tunnels/s",
        f"  node-a: {es['a']['sas']:,} SAs + {es['a']['policies']:,} policies"
        f" (formula: {ep['sas']:,} + {ep['policies']:,}),"
        f" RSS {es['a']['VmRSS']} MiB (peak {es['a']['VmHWM']}); node-b: {es['b']['sas']:,} SAs +"
        f" {es['b']['policies']:,} policies, RSS {es['b']['VmRSS']} MiB",
        f"  warm connect over an existing tunnel: median {eg['warm_connect_ms'].get('median')} ms; mutual TLS 1.3"
        f" median {eg['tls_ms'].get('median')} ms",
    ]
    for name, run in (("on demand", od), ("eager", eg)):
        for node, w in sorted(run.get("log_warnings", {}).items()):
            if w["count"]:
                lines.append(f"  {name}, node-{node}: {w['count']} warnings/errors logged, last: {w['last'][-1][:160]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--local-pods", type=int, default=200)
    parser.add_argument("--remote-pods", type=int, default=9800)
    parser.add_argument("--peers", type=int, default=10, help="distinct remote pods each local pod talks to")
    parser.add_argument("--eager-local", type=int, default=20, help="eager peer run: local pods")
    parser.add_argument("--eager-remote", type=int, default=100, help="eager peer run: remote pods")
    parser.add_argument("--sequential", type=int, default=30, help="first connections timed one at a time")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in flight during the waves")
    parser.add_argument("--rekey-pods", type=int, default=10, help="local pods whose tunnels are rekeyed")
    parser.add_argument("--skip-eager", action="store_true", help="only the on-demand boot (no peer: a partial run)")
    parser.add_argument("--timeout", type=int, default=3000, help="seconds before a UML run is stopped")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    parser.add_argument("--strace", action="store_true", help="count the bridges' syscalls per sequential pair")
    parser.add_argument("--inside", choices=("ondemand", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args.inside, json.loads(args.opts))
    problems = []
    if not (4 <= args.local_pods <= 30000 and 1 <= args.remote_pods <= 30000):
        problems.append("--local-pods must be 4..30000 and --remote-pods 1..30000 (one /17 per side)")
    if not 1 <= args.peers <= args.remote_pods:
        problems.append("--peers must be 1..--remote-pods (distinct peers)")
    if not (1 <= args.eager_local <= 30000 and 1 <= args.eager_remote <= 30000):
        problems.append("--eager-local/--eager-remote must be 1..30000")
    if not 0 <= args.sequential <= args.local_pods // 4 * args.peers:
        problems.append("--sequential must fit in the first wave (0..local/4 x peers)")
    if not (1 <= args.concurrency <= 1024 and 1 <= args.rekey_pods <= args.local_pods):
        problems.append("--concurrency must be 1..1024 and --rekey-pods 1..--local-pods")
    if args.strace and shutil.which("strace") is None:
        problems.append("--strace needs strace on PATH (Debian: apt-get install strace)")
    if problems:
        print("ondemand_scale: " + "; ".join(problems), file=sys.stderr)
        return 2
    opts = {"local": args.local_pods, "remote": args.remote_pods, "peers": args.peers, "eager_local": args.eager_local,
            "eager_remote": args.eager_remote, "sequential": args.sequential, "concurrency": args.concurrency,
            "rekey_pods": args.rekey_pods, "strace": int(args.strace)}  # fmt: skip
    results: dict[str, Any] = {}
    for mode in ("ondemand",) if args.skip_eager else ("eager", "ondemand"):
        # run_inside passes `--inside` first: the mode is its value
        got = run_inside(f"ondemand_scale ({mode})", __file__, [mode, "--opts", json.dumps(opts)],
                         timeout=args.timeout, mem="3G")  # fmt: skip
        if got is None:
            if results:  # what the other boot measured is not lost
                print(json.dumps(results, indent=2))
            return 1
        results[mode] = got
    if args.json or args.skip_eager:
        print(json.dumps(results, indent=2))
    else:
        print(report(results["ondemand"], results["eager"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
