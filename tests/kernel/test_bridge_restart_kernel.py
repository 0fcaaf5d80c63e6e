"""zt-bridge restarts on a real Linux 6.1 kernel (user-mode-linux): adopted tunnels never stop carrying traffic.

One UML boot, the topology, mesh and guest helpers test_bridge_kernel.py uses too (tests/kernel/bridge_guest.py):

1. Both bridges up, two floods at 0.01 s (a1 -> b1: node-a initiates that tunnel; b2 -> a1: node-b initiates
   it, node-a responds), captured on both nodes' underlay.
2. node-a's bridge is SIGKILLed (no cleanup) and started again: it adopts the kernel's tunnels (same SPIs),
   rekeys them (as initiator, or by asking the initiator), and the adopted SAs go after the grace period.
3. node-b's bridge is SIGKILLed, and while it is down the policy changes so that {a2, b2} is refused (node-a
   removes its side at once). node-b's bridge starts again: it adopts all three tunnels (it cannot know yet),
   then, once synced, rekeys the two still admitted and removes {a2, b2}; nothing of that pair gets through.
   The floods end: not one packet lost, no plaintext on the wire.

Run as a script, this file is the guest program (prints `RESULT <json>`; key material never leaves the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from tests.kernel.bridge_guest import (  # noqa: E402
    A1,
    A2,
    ADMIN,
    B1,
    B2,
    PATTERN,
    Guest,
    ping,
    run_guest,
    wire,
    xfrm_stat,
)
from tests.kernel.guestlib import Capture, counters_moved  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

GRACE = 1.0  # the bridges run with --grace 1s (Guest.start_bridge)
FLOODED = (f"{A1}-{B1}", f"{A1}-{B2}")  # node-a's view of the two flooded tunnels


# ================================================================================================================
# host side


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    return run_guest("pod", Path(__file__).resolve())


def test_the_kernel_never_allocates_a_live_spi(facts: dict[str, Any]) -> None:
    alloc = facts["allocspi"]
    assert alloc["live"].startswith("refused"), alloc  # ALLOCSPI for exactly a live SPI: none available
    assert alloc["free"] == "allocated", alloc  # the control: the same request for an unused SPI works


@pytest.mark.parametrize(("node", "kept"), [("a", 3), ("b", 2)])
def test_a_killed_bridge_adopts_its_tunnels_and_rekeys_them(facts: dict[str, Any], node: str, kept: int) -> None:
    r = facts[f"restart_{node}"]
    # the old process left 3 tunnels; the new one adopted all three, the SAs were never touched
    assert r["adoption"]["adopted"] == 3 and r["adoption"]["removed_at_start"] == {"sas": 0, "policies": 0}, r
    assert r["adoption"]["kept"] == kept and r["adoption"]["removed_after_sync"] == 3 - kept
    assert r["log_adopted"] == 3
    # its first /config_dump shows them as adopted, with the SPIs the killed process had
    first = r["first_dump"]
    assert first is not None and len(first) >= kept, "no /config_dump before the rekey"
    assert all((v["state"], v["spi_in"], v["spi_out"]) == ("adopted", *r["old_spis"][k]) for k, v in first.items())
    # every kernel sample between the kill and the rekey shows every old SA
    assert r["samples"] >= 5 and r["samples_missing_old"] == 0, r
    assert r["block_policies_seen"] == [2], r  # out + fwd for 10.0.0.0/8, in every sample
    # then a fresh handshake replaced each of them: new SPIs, new reqids, and the old SAs went after the grace
    assert len(r["new_spis"]) == kept
    for key, (spi_in, spi_out) in r["new_spis"].items():
        assert {spi_in, spi_out}.isdisjoint(r["old_spis"][key]), (key, r)
    assert r["origins"] == ["handshake"] * kept
    assert r["history_reasons"] == [["adopted at restart", "replacing adopted keys"]] * kept, r["history_reasons"]
    assert r["old_left_after_grace"] == [], r
    # (how soon after its start: the guest waits up to 30 s for the rekeys; a busy host took 11 s, a quiet one 1-2 s;
    # the rekey interval is an hour, so this is the restart's rekey)
    expected = {"adopted": 3, "kept": kept, "rekeyed": kept} | ({"removed": 3 - kept} if kept < 3 else {})
    assert r["metrics"] == expected, r["metrics"]


def test_traffic_of_adopted_tunnels_never_stops(facts: dict[str, Any]) -> None:
    flood = facts["flood"]
    # on failure: when the lost echoes were sent, beside the story's events and every XFRM counter that moved
    why = json.dumps({k: flood[k] for k in ("result", "lost_at", "timeline", "counters_moved", "backlog_dropped",
                                            "socket_drops")})  # fmt: skip
    assert flood["socket_drops"] == {"a1->b1": 0, "b2->a1": 0}, why  # (the measuring sockets lost nothing either)
    for sent, received in flood["result"].values():
        assert sent >= 500 and received == sent, why
    assert flood["in_no_states"] == {"a": 0, "b": 0}, flood  # nothing arrived for an SPI already deleted
    assert flood["in_state_errors"] == {"a": 0, "b": 0}, flood
    assert flood["out_pol_block"] == {"a": 0, "b": 0}, flood


def test_each_generation_carried_the_floods_and_nothing_crossed_in_clear(facts: dict[str, Any]) -> None:
    flood = facts["flood"]
    wire = flood["wire"]
    for n in ("a", "b"):
        assert wire[n]["mesh_plaintext"] == 0 and wire[n]["pattern_frames"] == 0 and wire[n]["other"] == 0, wire[n]
    # the generations made by the two restarts (and the last one in particular) carried >= 100 packets each way
    by_spi = {**wire["a"]["esp_by_spi"], **wire["b"]["esp_by_spi"]}
    for stage in ("restart_a", "restart_b"):
        for key in FLOODED:
            spi_in, spi_out = facts[stage]["new_spis_a"][key]
            assert by_spi.get(spi_out, 0) >= 100 and by_spi.get(spi_in, 0) >= 100, (stage, key, by_spi)
    # no SPI was ever used twice on a node: three generations per tunnel, all distinct
    spis = [s for stage in ("initial", "restart_a", "restart_b") for pair in facts["spis_a"][stage].values()
            for s in pair]  # fmt: skip
    assert len(spis) == len(set(spis)) == 6 + 6 + 4


def test_a_tunnel_refused_while_its_bridge_was_down_is_removed_after_the_sync(facts: dict[str, Any]) -> None:
    d = facts["denied"]
    assert d["peer_removed_its_side"]
    assert {"tunnel": f"adopted/{B2}/{A2}", "reason": "not admitted after restart"} in d["removals"]
    assert sorted(d["rows"]) == [f"{B1}-{A1}", f"{B2}-{A1}"]
    assert d["sas_for_pair"] == 0 and d["policies_for_pair"] == 0
    assert d["ping"] == {"a2->b2": [5, 0], "b2->a2": [5, 0]}
    assert d["polblock"]["a"] >= 5 and d["polblock"]["b"] >= 5  # the block took the pair's traffic, both ways
    # (no plaintext: the pings ran inside the flood's captures, see above)


# ================================================================================================================
# guest side (runs inside UML as root)

FLOOD = r"""
import json, os, select, socket, struct, sys, time
dst, interval, stop_file, pattern = sys.argv[1], float(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
# This socket sees every ICMP message to the pod, the other flood's echo requests too. A flood starved of CPU for
# half a second (a busy host) then lost replies in its own receive buffer: keep only echo replies (ICMP_FILTER,
# SOL_RAW 255 / 1: a set bit filters that type out), with room for seconds of them (SO_RCVBUFFORCE 33: root).
s.setsockopt(255, 1, struct.pack("I", 0xFFFFFFFE))
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
def socket_drops():  # what the kernel dropped at this socket (/proc/net/raw, "drops": the last column)
    inode = str(os.fstat(s.fileno()).st_ino)
    for line in open("/proc/net/raw").read().splitlines()[1:]:
        if line.split()[9] == inode:
            return int(line.split()[-1])
    return -1
ident = os.getpid() & 0xFFFF
payload = pattern * 4
def packet(seq):
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    data = head + payload
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, ident, seq) + payload
sent, got, nxt, stop_at, sent_at = 0, set(), time.monotonic(), None, {}
print("flooding", flush=True)
def take():
    data = s.recv(65535)
    ihl = (data[0] & 0x0F) * 4
    kind, _, _, who, seq = struct.unpack_from("!BBHHH", data, ihl)
    if kind == 0 and who == ident:
        got.add(seq)
while True:
    now = time.monotonic()
    if stop_at is None and os.path.exists(stop_file):
        stop_at = now + 5.0  # stop sending; the last replies may be late on a guest starved of CPU
    if stop_at is not None and (now >= stop_at or len(got) == sent):
        break
    if stop_at is None and now >= nxt:
        sent += 1
        s.sendto(packet(sent & 0xFFFF), (dst, 0))
        sent_at[sent & 0xFFFF] = now
        nxt = max(nxt + interval, now)
    until = stop_at if stop_at is not None else nxt
    if select.select([s], [], [], max(0.0, until - time.monotonic()))[0]:
        take()
s.setblocking(False)
try:  # a reply already queued when the second ran out is a reply (a starved guest reads late)
    while True:
        take()
except BlockingIOError:
    pass
lost = sorted(round(sent_at[q], 3) for q in sent_at if q not in got)
print("%d packets transmitted, %d received" % (sent, len(got)), flush=True)
print("lost sent at %s" % json.dumps(lost[:200]), flush=True)
print("socket drops %d" % socket_drops(), flush=True)
"""


def ns(netns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *args]


class Flood:
    """ICMP echo every `interval` from a pod until told to stop; then until the last reply (at most 5 s)."""

    def __init__(self, pod: str, dst: str, interval: float = 0.01) -> None:
        self.pod, self.dst, self.interval = pod, dst, interval
        self.stop_file = Path(f"/run/stop-flood-{pod}")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = ns(self.pod, sys.executable, "-S", "-c", FLOOD, self.dst, str(self.interval), str(self.stop_file),
                  PATTERN.hex())  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        assert b"flooding" in await asyncio.wait_for(self.proc.stdout.readline(), 30)

    async def stop(self) -> tuple[int, int, list[float], int]:
        """(sent, received, when each lost echo was sent (the guest's monotonic clock), replies its socket dropped)."""
        assert self.proc is not None and self.proc.stdout is not None
        self.stop_file.touch()
        out = (await asyncio.wait_for(self.proc.stdout.read(), 30)).decode()
        await self.proc.wait()
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        lost = re.search(r"lost sent at (\[.*\])", out)
        drops = re.search(r"socket drops (-?\d+)", out)
        if not found or not lost or not drops:
            raise RuntimeError(f"flood {self.pod} -> {self.dst}: {out!r}")
        return int(found.group(1)), int(found.group(2)), json.loads(lost.group(1)), int(drops.group(1))


NODES = {"a": ("node-a", "nodeA"), "b": ("node-b", "nodeB")}


def softnet_dropped() -> int:
    """Packets the kernel dropped because a CPU's input backlog was full (net.core.netdev_max_backlog): a guest
    starved of CPU drops here, before any XFRM counter sees the packet."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())


ERRORS = ("XfrmInStateProtoError", "XfrmInStateInvalid", "XfrmInStateSeqError", "XfrmInNoPols", "XfrmInTmplMismatch")


class RestartGuest(Guest):
    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, int] = {}
        self.timeline: list[tuple[float, str]] = []  # (guest monotonic clock, what happened): to place a lost echo

    def mark(self, what: str) -> None:
        self.timeline.append((time.monotonic(), what))

    async def adoption_metrics(self, name: str) -> dict[str, float]:
        async with self.http.get(f"http://127.0.0.1:{ADMIN[name]}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            found = re.match(r'zt_bridge_adoption_total\{decision="([^"]+)"\} (\S+)', line)
            if found:
                out[found.group(1)] = float(found.group(2))
        return out

    async def spis(self, name: str) -> dict[str, tuple[str, str]]:
        return {k: (r["spi_in"], r["spi_out"]) for k, r in (await self.rows(name)).items()}

    async def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        self.runs[name] = self.runs.get(name, 0) + 1  # keep each run's log
        await asyncio.to_thread(Path(f"/run/bridge-{name}.log").rename, f"/run/bridge-{name}.{self.runs[name]}.log")

    async def restart(
        self, name: str, kept: int = 3, meanwhile: Callable[[], Awaitable[None]] | None = None
    ) -> dict[str, Any]:
        """SIGKILL the bridge, (change something,) start it again, follow its adoption and rekey."""
        node, netns = NODES[name]
        old = await self.spis(name)
        old_ints = {int(s, 16) for pair in old.values() for s in pair}
        self.mark(f"kill {name}")
        await self.kill(name)
        if meanwhile is not None:
            await meanwhile()
        from ipsec_bridge.sa_manager import BRIDGE_MARK
        from ipsec_bridge.xfrm.consts import PolicyAction
        from ipsec_bridge.xfrm.netlink import XfrmSocket

        samples: list[set[int]] = []  # per kernel sample: the old SPIs missing
        blocks: list[int] = []  # per kernel sample: how many block policies
        first_dump: dict[str, Any] | None = None
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal first_dump
            while not done.is_set():
                live = {i.sa.spi for i in await self.our_sas(netns)}
                samples.append(old_ints - live)
                async with await XfrmSocket.open(netns) as sock:
                    ours = [i.policy for i in await sock.list_policies() if i.policy.mark == BRIDGE_MARK]
                blocks.append(sum(1 for pol in ours if pol.action == PolicyAction.BLOCK))
                if first_dump is None:
                    with contextlib.suppress(Exception):
                        rows = await self.rows(name)
                        if rows:
                            first_dump = {k: {"state": r["state"], "spi_in": r.get("spi_in"),
                                              "spi_out": r.get("spi_out")} for k, r in rows.items()}  # fmt: skip
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        self.mark(f"start {name}")
        await self.start_bridge(name, node, netns)
        ready = time.monotonic()
        self.mark(f"{name} ready")
        rows = await self.wait_rows(
            name, lambda r: len(r) == kept and all(x.get("origin") == "handshake" for x in r.values()), 30
        )
        rekeyed = time.monotonic()
        self.mark(f"{name} rekeyed")
        kept_ints = {int(s, 16) for k in rows for s in old[k]}
        done.set()
        await sampler
        await asyncio.sleep(GRACE + 1.0)
        left = [f"{n}:0x{i.sa.spi:08x}" for n in ("nodeA", "nodeB") for i in await self.our_sas(n)
                if i.sa.spi in old_ints]  # fmt: skip
        log = await asyncio.to_thread(Path(f"/run/bridge-{name}.log").read_text)
        dump = await self.dump(name)
        return {
            "old_spis": old,
            "new_spis": {k: (r["spi_in"], r["spi_out"]) for k, r in rows.items()},
            "new_spis_a": await self.spis("a"),
            "first_dump": first_dump,
            "samples": len(samples),
            # tunnels still admitted: their old SAs must be there from the kill until the rekey
            "samples_missing_old": sum(1 for missing in samples if missing & kept_ints),
            "block_policies_seen": sorted(set(blocks)),
            "origins": [r["origin"] for r in rows.values()],
            "history_reasons": [[h["reason"] for h in r["history"]] for r in rows.values()],
            "old_left_after_grace": left,
            "ready_s": round(ready - t0, 2),
            "rekeyed_after_ready_s": round(rekeyed - ready, 2),
            "adoption": dump["adoption"],
            "log_adopted": log.count("start: adopting tunnel"),
            "metrics": await self.adoption_metrics(name),
        }

    async def allocspi(self) -> dict[str, str]:
        """ALLOCSPI for exactly a live SPI must find none; for a free one it must work (then it is deleted)."""
        from ipaddress import ip_address

        from ipsec_bridge.sa_manager import BRIDGE_MARK
        from ipsec_bridge.xfrm import messages as m
        from ipsec_bridge.xfrm.netlink import XfrmError, XfrmSocket

        live = int((await self.rows("a"))[f"{A1}-{B1}"]["spi_in"], 16)
        src, dst = ip_address("192.168.50.2"), ip_address("192.168.50.1")
        out: dict[str, str] = {}
        async with await XfrmSocket.open("nodeA") as sock:
            for label, spi in (("live", live), ("free", 0xFEED0001)):
                try:
                    info = await sock.alloc_spi(m.SpiRequest(src, dst, spi, spi, mark=BRIDGE_MARK))
                    out[label] = "allocated"
                    await sock.delete_sa(info.sa.id())
                except XfrmError as err:
                    out[label] = f"refused: {err}"
        return out

    async def story(self) -> None:
        f = self.facts
        await asyncio.gather(self.start_bridge("a", *NODES["a"]), self.start_bridge("b", *NODES["b"]))
        for name in ("a", "b"):
            await self.wait_rows(name, lambda rows: len(rows) == 3 and all(r["state"] == "up" for r in rows.values()))
        f["allocspi"] = await self.allocspi()
        f["spis_a"] = {"initial": await self.spis("a")}

        caps = {"a": Capture("nodeA", "eth0", "/run/fa.pcap"), "b": Capture("nodeB", "eth0", "/run/fb.pcap")}
        for c in caps.values():
            await c.start()
        stat0 = {n: await xfrm_stat(netns) for n, (_, netns) in NODES.items()}
        backlog0 = softnet_dropped()
        floods = {"a1->b1": Flood("a1", B1), "b2->a1": Flood("b2", A1)}
        for fl in floods.values():
            await fl.start()
        t0 = time.monotonic()
        await asyncio.sleep(2.0)
        f["restart_a"] = await self.restart("a")
        f["spis_a"]["restart_a"] = await self.spis("a")
        await asyncio.sleep(1.0)
        f["restart_b"] = await self.restart("b", kept=2, meanwhile=self.deny_a2_b2)
        f["spis_a"]["restart_b"] = await self.spis("a")
        mid = {n: await xfrm_stat(netns) for n, (_, netns) in NODES.items()}
        f["denied"] = await self.denied_pair()  # while the floods go on
        await asyncio.sleep(1.0)  # the last generation carries the floods for a while
        stopped = {k: await fl.stop() for k, fl in floods.items()}
        stat1 = {n: await xfrm_stat(netns) for n, (_, netns) in NODES.items()}
        f["flood"] = {
            "result": {k: [sent, received] for k, (sent, received, _, _) in stopped.items()},
            # when a lost echo was sent, and what happened around it (seconds after the floods began)
            "lost_at": {k: [round(t - t0, 2) for t in lost] for k, (_, _, lost, _) in stopped.items() if lost},
            "socket_drops": {k: drops for k, (_, _, _, drops) in stopped.items()},  # the measuring end's own losses
            "timeline": [(round(t - t0, 2), what) for t, what in self.timeline],
            "counters_moved": {n: counters_moved(stat0[n], stat1[n]) for n in NODES},
            "backlog_dropped": softnet_dropped() - backlog0,
            "seconds": round(time.monotonic() - t0, 1),
            "wire": {n: await wire(c) for n, c in caps.items()},
            "in_no_states": {n: stat1[n].get("XfrmInNoStates", 0) - stat0[n].get("XfrmInNoStates", 0) for n in NODES},
            "in_state_errors": {n: sum(stat1[n].get(k, 0) - stat0[n].get(k, 0) for k in ERRORS) for n in NODES},
            # up to the denied pair's pings, not one packet fell to the block
            "out_pol_block": {n: mid[n].get("XfrmOutPolBlock", 0) - stat0[n].get("XfrmOutPolBlock", 0) for n in NODES},
        }

    async def deny_a2_b2(self) -> None:
        """While node-b's bridge is down: {a2, b2} is refused from now on; node-a removes its side."""
        from tests.support.bridge_mesh import POLICIES, write_mesh

        deny = (
            POLICIES
            + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: debug-deny-cart, namespace: shop}
spec:
  selector: {matchLabels: {app: debug}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/cart"]}}]}]
"""
        )
        self.mark("{a2, b2} denied")
        write_mesh(self.mesh, deny)
        self.facts["peer_removed"] = False
        with contextlib.suppress(TimeoutError):
            await self.wait_rows("a", lambda r: f"{A2}-{B2}" not in r, 20)
            self.facts["peer_removed"] = True

    async def denied_pair(self) -> dict[str, Any]:
        from ipsec_bridge.sa_manager import BRIDGE_MARK
        from ipsec_bridge.xfrm.netlink import XfrmSocket

        dump = await self.dump("b")
        pair = {A2, B2}
        sas = [i for i in await self.our_sas("nodeB")
               if {str(i.sa.selector.src.network_address), str(i.sa.selector.dst.network_address)} == pair]  # fmt: skip
        async with await XfrmSocket.open("nodeB") as sock:
            pols = [p.policy for p in await sock.list_policies() if p.policy.mark == BRIDGE_MARK]
        pols = [p for p in pols if {str(p.selector.src.network_address), str(p.selector.dst.network_address)} == pair]
        block0 = {n: (await xfrm_stat(netns)).get("XfrmOutPolBlock", 0) for n, (_, netns) in NODES.items()}
        self.mark("pings of {a2, b2}")
        pings = {"a2->b2": list(await ping("a2", B2, 5, "0.2")), "b2->a2": list(await ping("b2", A2, 5, "0.2"))}
        block1 = {n: (await xfrm_stat(netns)).get("XfrmOutPolBlock", 0) for n, (_, netns) in NODES.items()}
        return {
            "peer_removed_its_side": self.facts.pop("peer_removed"),
            "rows": sorted(await self.rows("b")),
            "removals": [{k: r[k] for k in ("tunnel", "reason")} for r in dump["recent_removals"]],
            "sas_for_pair": len(sas),
            "policies_for_pair": len(pols),
            "ping": pings,
            "polblock": {n: block1[n] - block0[n] for n in NODES},
        }


def guest_main() -> None:
    os.environ.setdefault("TMPDIR", "/run")
    facts = asyncio.run(RestartGuest().run("pod"))
    for log in sorted(Path("/run").glob("bridge-*.log")):
        print(f"--- {log.name} (tail)", file=sys.stderr)
        print(log.read_text()[-3000:], file=sys.stderr)
    print("RESULT " + json.dumps(facts, default=str))


if __name__ == "__main__":
    guest_main()
