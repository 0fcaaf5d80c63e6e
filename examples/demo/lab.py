"""The demo's nodes: two network namespaces joined by a veth underlay, a namespace per pod behind each, one
zt-bridge per node, and a small HTTP API the show (examples/demo/show.py) drives them through.

It runs as root in whatever kernel has ESP: this host's, or the project's user-mode-linux kernel, booted by
the show with a link to the host (then the API listens on the guest's end of that link). Everything it
reports is read from the kernel at that moment: ping's own summary, tcpdump's capture, the SAs' counters.

    python examples/demo/lab.py --config FILE      (FILE: JSON written by the show; see Lab.__init__)

API (JSON in, JSON out): GET /health; POST /ping {pod, dst, count, interval}; POST /tcp {pod, dst, bytes};
POST /capture/start {names: [node or pod]}; POST /capture/stop {id}; GET /sas?node=; GET /stat?node=;
POST /flood/start {pod, dst, count, interval}; POST /flood/wait {id}; POST /shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from aiohttp import web

PATTERN = bytes.fromhex("5a7e5a7e0ddba11cafe0f00d")  # in every ping payload and TCP stream the lab sends
ECHO_PORT = 7000
PREFIX = "ztdemo-"  # every namespace the lab makes, so a crashed run's leftovers can be found and removed


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def in_ns(netns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *args]


def ns_name(name: str) -> str:
    """shop/frontend-1 -> ztdemo-shop-frontend-1; node-a -> ztdemo-node-a."""
    return PREFIX + name.replace("/", "-")


def remove_leftovers() -> None:
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            sh("ip", "netns", "del", name, check=False)


# --- capture -------------------------------------------------------------------------------------------------


class Capture:
    """tcpdump on one netns's eth0, egress only (tunnel mode re-injects decrypted packets on ingress)."""

    def __init__(self, netns: str, path: Path) -> None:
        self.netns, self.path = netns, path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # -B: a 32 MiB ring; with the default 2 MiB a busy guest's tcpdump drops frames (tests/kernel/README.md)
        argv = in_ns(self.netns, "tcpdump", "-i", "eth0", "-Q", "out", "--immediate-mode", "-U", "-n", "-B", "32768",
                     "-w", str(self.path))  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        assert self.proc.stderr is not None
        line = await asyncio.wait_for(self.proc.stderr.readline(), 30)
        if b"listening on" not in line:
            raise RuntimeError(f"tcpdump in {self.netns}: {line.decode(errors='replace').strip()}")

    async def stop(self, mesh: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stderr is not None
        await asyncio.sleep(0.3)  # the last packets reach the file
        self.proc.send_signal(signal.SIGINT)
        stats = (await asyncio.wait_for(self.proc.stderr.read(), 30)).decode(errors="replace")
        await asyncio.wait_for(self.proc.wait(), 30)
        dropped = re.search(r"(\d+) packets? dropped by kernel", stats)
        out = classify(read_pcap(self.path), mesh)
        out["dropped_by_kernel"] = int(dropped.group(1)) if dropped else None
        self.path.unlink(missing_ok=True)
        return out


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    endian = "<" if struct.unpack_from("<I", data)[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    frames, off = [], 24
    while off + 16 <= len(data):
        caplen = struct.unpack_from(f"{endian}I", data, off + 8)[0]
        frames.append(data[off + 16 : off + 16 + caplen])
        off += 16 + caplen
    return frames


def classify(frames: list[bytes], mesh: Any) -> dict[str, Any]:
    """ESP by SPI; pod packets in clear (either address in the mesh CIDR); ARP (the nodes resolving each other's
    underlay address, whenever the kernel re-checks its neighbour entry); the payload pattern anywhere; anything
    else described in `others`."""
    out: dict[str, Any] = {"frames": len(frames), "esp": 0, "pod_plaintext": 0, "pattern_frames": 0, "arp": 0,
                           "other": 0}  # fmt: skip
    by_spi: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    for frame in frames:
        if PATTERN in frame:
            out["pattern_frames"] += 1
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0806:
            out["arp"] += 1
            continue
        if ethertype != 0x0800:
            out["other"] += 1
            others[f"ethertype 0x{ethertype:04x}"] += 1
            continue
        ip = frame[14:]
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        if proto == 50:
            out["esp"] += 1
            by_spi[f"0x{struct.unpack_from('!I', ip, ihl)[0]:08x}"] += 1
        elif ip_address(ip[12:16]) in mesh or ip_address(ip[16:20]) in mesh:
            out["pod_plaintext"] += 1
        else:
            out["other"] += 1
            others[f"IP proto {proto} {ip_address(ip[12:16])} -> {ip_address(ip[16:20])}"] += 1
    out["esp_by_spi"] = dict(by_spi)
    out["others"] = dict(others)
    return out


# --- the lab -------------------------------------------------------------------------------------------------


class Lab:
    def __init__(self, cfg: dict[str, Any]) -> None:
        # cfg: listen, port, mesh_cidr, log_dir, python, repo, nodes {name: {address, gateway, peers {cidr: node}}},
        # pods [{name, ip, node}], bridge {xds, root_cert, tokens {node: path}, admin_address, admin_ports {node}}
        self.cfg = cfg
        self.mesh = ip_network(cfg["mesh_cidr"])
        self.pods = {p["name"]: p for p in cfg["pods"]}
        self.bridges: dict[str, asyncio.subprocess.Process] = {}
        self.captures: dict[str, dict[str, Capture]] = {}
        self.floods: dict[str, asyncio.subprocess.Process] = {}
        self.echo: dict[str, asyncio.subprocess.Process] = {}
        self.ready = False
        self.error = ""
        self.stop = asyncio.Event()
        self.scratch = Path(tempfile.mkdtemp(prefix="ztdemo-lab-"))

    # topology: what a CNI would have done on each node
    def build(self) -> None:
        remove_leftovers()
        uplink = self.cfg.get("uplink")
        if uplink:  # inside user-mode-linux: the link to the host, where ztd runs and the show talks to us
            sh("ip", "addr", "add", uplink["address"], "dev", uplink["dev"])
            sh("ip", "link", "set", uplink["dev"], "up")
        nodes = self.cfg["nodes"]
        for name in (*nodes, *self.pods):
            netns = ns_name(name)
            sh("ip", "netns", "add", netns)
            sh("ip", "-n", netns, "link", "set", "lo", "up")
            sh(*in_ns(netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"))
        a, b = nodes
        sh("ip", "link", "add", "eth0", "netns", ns_name(a), "type", "veth", "peer", "eth0", "netns", ns_name(b))
        for name, node in nodes.items():
            netns = ns_name(name)
            sh("ip", "-n", netns, "addr", "add", f"{node['address']}/24", "dev", "eth0")
            sh("ip", "-n", netns, "link", "set", "eth0", "up")
            sh(*in_ns(netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
            for cidr, peer in node["peers"].items():
                sh("ip", "-n", netns, "route", "add", cidr, "via", nodes[peer]["address"])
        count: collections.Counter[str] = collections.Counter()
        for pod in self.pods.values():
            node, netns = nodes[pod["node"]], ns_name(pod["name"])
            link = f"vp{count[pod['node']]}"
            count[pod["node"]] += 1
            sh("ip", "link", "add", "eth0", "netns", netns, "type", "veth", "peer", link, "netns", ns_name(pod["node"]))
            sh("ip", "-n", ns_name(pod["node"]), "addr", "add", f"{node['gateway']}/32", "dev", link)
            sh("ip", "-n", ns_name(pod["node"]), "link", "set", link, "up")
            sh("ip", "-n", ns_name(pod["node"]), "route", "add", f"{pod['ip']}/32", "dev", link)
            sh("ip", "-n", netns, "addr", "add", f"{pod['ip']}/32", "dev", "eth0")
            sh("ip", "-n", netns, "link", "set", "eth0", "up")
            sh("ip", "-n", netns, "route", "add", node["gateway"], "dev", "eth0")
            sh("ip", "-n", netns, "route", "add", "default", "via", node["gateway"], "dev", "eth0")

    async def start_bridges(self) -> None:
        b = self.cfg["bridge"]
        for name, node in self.cfg["nodes"].items():
            argv = [
                self.cfg["python"], "-m", "ipsec_bridge.main", "--node", name, "--netns", ns_name(name),
                "--node-address", node["address"], "--xds-address", b["xds"], "--ca-address", b["xds"],
                "--token-file", b["tokens"][name], "--root-cert", b["root_cert"], "--mesh-cidr", self.cfg["mesh_cidr"],
                "--admin-address", b["admin_address"], "--admin-port", str(b["admin_ports"][name]), "--grace", "1s",
            ]  # fmt: skip
            with (Path(self.cfg["log_dir"]) / f"zt-bridge-{name}.log").open("wb") as log:
                self.bridges[name] = await asyncio.create_subprocess_exec(
                    *argv, stdout=log, stderr=log, cwd=self.cfg["repo"], start_new_session=True
                )

    async def wait_bridges(self) -> None:
        """Ready when each bridge's admin port says so (it has synced with ztd and holds its pods' certificates)."""
        import aiohttp

        b = self.cfg["bridge"]
        async with aiohttp.ClientSession() as session:
            for name, proc in self.bridges.items():
                url = f"http://{b['admin_address']}:{b['admin_ports'][name]}/ready"
                while proc.returncode is None:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.2)
        self.ready = all(p.returncode is None for p in self.bridges.values())

    async def run(self) -> None:
        app = web.Application()
        app.add_routes([
            web.get("/health", self.health), web.post("/ping", self.ping), web.post("/tcp", self.tcp),
            web.post("/capture/start", self.capture_start), web.post("/capture/stop", self.capture_stop),
            web.get("/sas", self.sas), web.get("/stat", self.stat), web.post("/flood/start", self.flood_start),
            web.post("/flood/wait", self.flood_wait), web.post("/shutdown", self.shutdown),
        ])  # fmt: skip
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await asyncio.to_thread(self.build)
        except (RuntimeError, OSError) as err:
            self.error = str(err)
        # the API answers even when the build failed: the show reads the reason from /health
        await web.TCPSite(runner, self.cfg["listen"], self.cfg["port"]).start()
        if not self.error:
            await self.start_bridges()
            await self.wait_bridges()
        try:
            await self.stop.wait()
        finally:
            await self.close()
            await runner.cleanup()

    async def close(self) -> None:
        for proc in [*self.bridges.values(), *self.floods.values(), *self.echo.values()]:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in [*self.bridges.values(), *self.floods.values(), *self.echo.values()]:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 15)
        await asyncio.to_thread(remove_leftovers)

    # --- handlers ----------------------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        exited = {n: p.returncode for n, p in self.bridges.items() if p.returncode is not None}
        return web.json_response({"ready": self.ready and not exited, "error": self.error, "exited": exited,
                                  "kernel": os.uname().release})  # fmt: skip

    def _pod(self, body: dict[str, Any]) -> str:
        if body.get("pod") not in self.pods:
            raise web.HTTPBadRequest(text=f"no pod {body.get('pod')!r}")
        return ns_name(body["pod"])

    def _ping_argv(self, body: dict[str, Any]) -> list[str]:
        netns, dst = self._pod(body), str(ip_address(body["dst"]))
        count, interval = int(body.get("count", 5)), float(body.get("interval", 0.2))
        return in_ns(netns, "ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", "1", "-p",
                     PATTERN.hex(), dst)  # fmt: skip

    async def ping(self, request: web.Request) -> web.Response:
        argv = self._ping_argv(await request.json())
        out = await asyncio.to_thread(sh, *argv, check=False)
        return web.json_response(ping_summary(out))

    async def tcp(self, request: web.Request) -> web.Response:
        """Send `bytes` of the pattern over TCP to an echo server in the destination pod and read them back."""
        body = await request.json()
        src, dst = self._pod(body), str(ip_address(body["dst"]))
        target = next((p["name"] for p in self.pods.values() if p["ip"] == dst), None)
        if target is None:
            raise web.HTTPBadRequest(text=f"no pod has {dst}")
        if target not in self.echo:
            server = (
                "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                f"s.bind(('0.0.0.0',{ECHO_PORT}));s.listen(8)\n"
                "while True:\n c,_=s.accept()\n while True:\n  d=c.recv(65536)\n  if not d: break\n  c.sendall(d)\n"
                " c.close()"
            )
            self.echo[target] = await asyncio.create_subprocess_exec(
                *in_ns(ns_name(target), self.cfg["python"], "-S", "-c", server)
            )
            await asyncio.sleep(0.5)
        size = int(body.get("bytes", 65536))
        client = (
            f"import socket,time\np=(bytes.fromhex('{PATTERN.hex()}')*({size}//12+1))[:{size}]\n"
            f"t=time.monotonic();c=socket.create_connection(('{dst}',{ECHO_PORT}),5)\n"
            "c.sendall(p);c.shutdown(socket.SHUT_WR);got=b''\n"
            "while True:\n d=c.recv(65536)\n if not d: break\n got+=d\n"
            "print(len(got), int(got==p), round(time.monotonic()-t,3))"
        )
        out = (await asyncio.to_thread(sh, *in_ns(src, self.cfg["python"], "-S", "-c", client), check=False)).split()
        if len(out) != 3:
            return web.json_response({"sent": size, "echoed": 0, "intact": False, "seconds": None})
        echoed, intact, seconds = int(out[0]), out[1] == "1", float(out[2])
        return web.json_response({"sent": size, "echoed": echoed, "intact": intact, "seconds": seconds})

    async def capture_start(self, request: web.Request) -> web.Response:
        names = (await request.json())["names"]
        ident = f"c{len(self.captures) + 1}"
        caps = {}
        for name in names:
            if name not in self.cfg["nodes"] and name not in self.pods:
                raise web.HTTPBadRequest(text=f"no node or pod {name!r}")
            caps[name] = Capture(ns_name(name), self.scratch / f"{ident}-{ns_name(name)}.pcap")
            await caps[name].start()
        self.captures[ident] = caps
        return web.json_response({"id": ident})

    async def capture_stop(self, request: web.Request) -> web.Response:
        caps = self.captures.pop((await request.json())["id"])
        return web.json_response({name: await cap.stop(self.mesh) for name, cap in caps.items()})

    def _node(self, request: web.Request) -> str:
        node = request.query.get("node", "")
        if node not in self.cfg["nodes"]:
            raise web.HTTPBadRequest(text=f"no node {node!r}")
        return ns_name(node)

    async def sas(self, request: web.Request) -> web.Response:
        from ipsec_bridge.xfrm.netlink import XfrmSocket

        async with await XfrmSocket.open(self._node(request)) as sock:
            infos = await sock.list_sas()
        return web.json_response([
            {"spi": f"0x{i.sa.spi:08x}", "src": str(i.sa.src), "dst": str(i.sa.dst),
             "sel_src": str(i.sa.selector.src), "sel_dst": str(i.sa.selector.dst),
             "packets": i.current.packets, "bytes": i.current.bytes, "keyed": i.sa.aead is not None}
            for i in infos
        ])  # fmt: skip

    async def stat(self, request: web.Request) -> web.Response:
        text = await asyncio.to_thread(sh, *in_ns(self._node(request), "cat", "/proc/net/xfrm_stat"))
        return web.json_response({k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())})

    async def flood_start(self, request: web.Request) -> web.Response:
        argv = self._ping_argv(await request.json())
        ident = f"f{len(self.floods) + 1}"
        self.floods[ident] = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        return web.json_response({"id": ident})

    async def flood_wait(self, request: web.Request) -> web.Response:
        proc = self.floods.pop((await request.json())["id"])
        out, _ = await proc.communicate()
        return web.json_response(ping_summary(out.decode()))

    async def shutdown(self, _: web.Request) -> web.Response:
        self.stop.set()
        return web.json_response({"stopping": True})


def ping_summary(text: str) -> dict[str, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    if not found:
        return {"sent": 0, "received": 0}
    return {"sent": int(found.group(1)), "received": int(found.group(2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())
    sys.path.insert(0, cfg["repo"])
    started = time.monotonic()
    lab = Lab(cfg)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lab.stop.set)
        await lab.run()

    asyncio.run(serve())
    print(f"lab stopped after {time.monotonic() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
