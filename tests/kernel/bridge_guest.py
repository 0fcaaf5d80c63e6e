"""The zt-bridge UML tests' shared guest: the two-node topology of tests/kernel/test_bridge_kernel.py, ztd with
the mesh of tests/support/bridge_mesh.py, the bridges' admin endpoints, ping/capture/xfrm_stat probes (guest side),
and run_guest, which boots UML on a test file run as the guest program (host side).

Each test file subclasses Guest with its stories and, run as a script, prints `RESULT <json>`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.guestlib import Capture
from tests.kernel.uml import run_in_uml

REPO = Path(__file__).resolve().parents[2]
PATTERN = bytes.fromhex("5a7e5a7e0ddba11cafe0f00d")  # in every ping payload and the TCP stream
A1, A2, B1, B2 = "10.1.0.10", "10.1.0.11", "10.2.0.10", "10.2.0.11"
NODE_A, NODE_B = "192.168.50.1", "192.168.50.2"
ADMIN = {"a": 15031, "b": 15032}
HANDSHAKE_PORT = 15009


# ================================================================================================================
# host side


def run_guest(scenario: str, script: Path) -> dict[str, Any]:
    """Boot UML, run a guest program (a test file run as a script), return the facts of its RESULT line."""
    done = run_in_uml([sys.executable, str(script), scenario], 420, env={"PYTHONPATH": str(REPO)})
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if os.environ.get("ZT_BRIDGE_FACTS"):  # for calibrating the assertions: where to keep the raw facts
        with open(os.environ["ZT_BRIDGE_FACTS"], "a") as out_file:
            out_file.write("\n".join(results) + "\n" + done.stderr + "\n")
    if done.returncode != 0 or not results:
        pytest.fail(f"guest exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    out: dict[str, Any] = json.loads(results[-1][len("RESULT ") :])
    return out


# ================================================================================================================
# guest side (runs inside UML as root)


def _sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


async def sh(*args: str, check: bool = True) -> str:
    return await asyncio.to_thread(_sh, *args, check=check)


def ns(netns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *args]


PODS = {"a1": ("nodeA", A1, "10.1.0.1"), "a2": ("nodeA", A2, "10.1.0.1"),
        "b1": ("nodeB", B1, "10.2.0.1"), "b2": ("nodeB", B2, "10.2.0.1")}  # fmt: skip


async def build_topology() -> None:
    for name in ("nodeA", "nodeB", *PODS):
        await sh("ip", "netns", "add", name)
        await sh("ip", "-n", name, "link", "set", "lo", "up")
        await sh(*ns(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"))
    await sh("ip", "link", "add", "eth0", "netns", "nodeA", "type", "veth", "peer", "eth0", "netns", "nodeB")
    for node, addr in (("nodeA", NODE_A), ("nodeB", NODE_B)):
        await sh("ip", "-n", node, "addr", "add", f"{addr}/24", "dev", "eth0")
        await sh("ip", "-n", node, "link", "set", "eth0", "up")
        await sh(*ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=1",
                     "net.ipv4.conf.default.rp_filter=1"))  # fmt: skip
    # Calico-style pod links: a /32 per pod, the node answers for the gateway on every pod link
    for pod, (node, ip, gateway) in PODS.items():
        dev = f"v{pod}"
        await sh("ip", "link", "add", "eth0", "netns", pod, "type", "veth", "peer", dev, "netns", node)
        await sh("ip", "-n", node, "addr", "add", f"{gateway}/32", "dev", dev)
        await sh("ip", "-n", node, "link", "set", dev, "up")
        await sh(*ns(node, "sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=1"))
        await sh("ip", "-n", node, "route", "add", f"{ip}/32", "dev", dev)
        await sh("ip", "-n", pod, "addr", "add", f"{ip}/32", "dev", "eth0")
        await sh("ip", "-n", pod, "link", "set", "eth0", "up")
        await sh("ip", "-n", pod, "route", "add", gateway, "dev", "eth0")
        await sh("ip", "-n", pod, "route", "add", "default", "via", gateway, "dev", "eth0")
    await sh("ip", "-n", "nodeA", "route", "add", "10.2.0.0/16", "via", NODE_B)
    await sh("ip", "-n", "nodeB", "route", "add", "10.1.0.0/16", "via", NODE_A)


async def xfrm_stat(netns: str) -> dict[str, int]:
    text = await sh(*ns(netns, "cat", "/proc/net/xfrm_stat"))
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


async def ping(pod: str, dst: str, count: int, interval: str, *extra: str) -> tuple[int, int]:
    argv = ns(pod, "ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", "1", "-p", PATTERN.hex(), *extra, dst)
    out = await sh(*argv, check=False)
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if not found:
        raise RuntimeError(f"no ping summary: {out[-300:]!r}")
    return int(found.group(1)), int(found.group(2))


async def wire(capture: Capture) -> dict[str, Any]:
    """Stop a capture (complete: see Capture.stop) and classify its frames."""
    return classify(await capture.stop())


def classify(frames: list[bytes]) -> dict[str, Any]:
    """ESP by SPI; handshake TCP between the bridges; any pod (10/8) packet in clear; anything else."""
    out: dict[str, Any] = {"esp": 0, "handshake": 0, "mesh_plaintext": 0, "other": 0, "non_ip": 0, "pattern_frames": 0}
    by_spi: collections.Counter[str] = collections.Counter()
    for frame in frames:
        if PATTERN in frame:
            out["pattern_frames"] += 1
        if struct.unpack_from("!H", frame, 12)[0] != 0x0800:
            out["non_ip"] += 1
            continue
        ip = frame[14:]
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        src, dst = ip[12:16], ip[16:20]
        if proto == 50:
            out["esp"] += 1
            by_spi[f"0x{struct.unpack_from('!I', ip, ihl)[0]:08x}"] += 1
        elif src[0] == 10 or dst[0] == 10:
            out["mesh_plaintext"] += 1
        elif proto == 6 and HANDSHAKE_PORT in struct.unpack_from("!HH", ip, ihl):
            out["handshake"] += 1
        else:
            out["other"] += 1
    out["esp_by_spi"] = dict(by_spi)
    return out


class Guest:
    """ztd and the two bridges in the guest, and what the stories ask of them; a subclass tells its stories."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.http: Any = None

    async def start_ztd(self) -> None:
        from tests.support.bridge_mesh import write_mesh
        from xds_server.main import Ztd, ZtdConfig

        self.mesh = write_mesh(Path("/run/mesh"))
        cfg = ZtdConfig(
            listen_address="127.0.0.1", xds_port=15010, secure_port=15012, monitoring_port=15014,
            state_dir=Path("/run/ztd"), config_dir=self.mesh,
        )  # fmt: skip
        self.ztd_cfg = cfg
        self.ztd = Ztd(cfg)
        self.ztd_stop = asyncio.Event()
        self.ztd_task = asyncio.create_task(self.ztd.run(self.ztd_stop))
        await asyncio.wait_for(self.ztd.ready.wait(), 120)

    def token(self, node: str) -> Path:
        from sds.ca import issuer

        tokens = issuer.load(self.ztd_cfg.state_dir / "issuer", "cluster.local")
        jwt = tokens.mint("istio-system", "ztunnel", audiences=["istio-ca"], duration=dt.timedelta(hours=1),
                          now=dt.datetime.now(dt.UTC), node_name=node)  # fmt: skip
        path = Path(f"/run/token-{node}")
        path.write_text(jwt)
        return path

    async def start_bridge(self, name: str, node: str, netns: str, *extra: str) -> None:
        argv = [
            sys.executable, "-m", "ipsec_bridge.main", "--node", node, "--netns", netns,
            "--xds-address", "127.0.0.1:15012", "--ca-address", "127.0.0.1:15012",
            "--token-file", str(self.token(node)), "--root-cert", str(self.ztd_cfg.published_root),
            "--mesh-cidr", "10.0.0.0/8", "--admin-port", str(ADMIN[name]), "--grace", "1s", *extra,
        ]  # fmt: skip
        log = open(f"/run/bridge-{name}.log", "wb")  # noqa: SIM115, ASYNC230 - the guest's own tmpfs, for the child
        self.procs[name] = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, cwd=str(REPO))
        async with asyncio.timeout(120):
            while True:
                with contextlib.suppress(Exception):
                    async with self.http.get(f"http://127.0.0.1:{ADMIN[name]}/ready") as resp:
                        if resp.status == 200:
                            return
                if self.procs[name].returncode is not None:
                    tail = await asyncio.to_thread(Path(f"/run/bridge-{name}.log").read_text)
                    raise RuntimeError(f"bridge {name} exited: {tail[-2000:]}")
                await asyncio.sleep(0.2)

    async def dump(self, name: str) -> dict[str, Any]:
        async with self.http.get(f"http://127.0.0.1:{ADMIN[name]}/config_dump") as resp:
            out: dict[str, Any] = await resp.json()
            return out

    async def rows(self, name: str) -> dict[str, dict[str, Any]]:
        dump = await self.dump(name)
        return {f"{r['local_address']}-{r['peer_address']}": r for r in dump["tunnels"]}

    async def metrics(self, name: str) -> dict[str, float]:
        async with self.http.get(f"http://127.0.0.1:{ADMIN[name]}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = collections.defaultdict(float)
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, value = line.rsplit(" ", 1)
            metric = key.split("{", 1)[0]
            if metric == "zt_bridge_xfrm_stat":
                out[key.split('counter="', 1)[1].split('"', 1)[0]] = float(value)
            elif metric == "zt_bridge_handshakes_total" and 'result="identity"' in key:
                out["identity_failures"] += float(value)
            elif metric == "zt_bridge_handshakes_total" and 'result="ok"' in key:
                out["handshakes_ok"] += float(value)
            elif metric == "zt_bridge_rekey_requests_total" and 'direction="received"' in key:
                out["rekey_requests_received"] += float(value)
            else:
                out[metric] += float(value)
        return dict(out)

    async def raw_metrics(self, name: str) -> dict[str, float]:
        """Every sample as `name{labels}` -> value (labels as rendered: sorted)."""
        async with self.http.get(f"http://127.0.0.1:{ADMIN[name]}/metrics") as resp:
            text = await resp.text()
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
        return {key: float(value) for key, value in samples}

    async def wait_rows(self, name: str, predicate: Any, seconds: float = 60) -> dict[str, dict[str, Any]]:
        async with asyncio.timeout(seconds):
            while True:
                rows = await self.rows(name)
                if predicate(rows):
                    return rows
                await asyncio.sleep(0.1)

    async def our_sas(self, netns: str) -> list[Any]:
        from ipsec_bridge.sa_manager import BRIDGE_MARK
        from ipsec_bridge.xfrm.netlink import XfrmSocket

        async with await XfrmSocket.open(netns) as sock:
            return [i for i in await sock.list_sas() if i.sa.mark == BRIDGE_MARK]

    def stories(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The scenarios this guest runs, by the name run_guest passes."""
        return {"pod": self.story}

    async def story(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} tells no pod story")

    # --- the run --------------------------------------------------------------------------------------------

    async def run(self, scenario: str) -> dict[str, Any]:
        import aiohttp

        stories = self.stories()
        if scenario not in stories:
            raise ValueError(f"{type(self).__name__} has no scenario {scenario!r} (it has: {', '.join(stories)})")
        await build_topology()
        started = time.monotonic()
        await self.start_ztd()
        self.facts["ztd_start_seconds"] = round(time.monotonic() - started, 1)
        async with aiohttp.ClientSession() as self.http:
            try:
                await stories[scenario]()
            finally:
                for proc in self.procs.values():
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in self.procs.values():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 20)
                self.ztd_stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ztd_task, 20)
        return self.facts
