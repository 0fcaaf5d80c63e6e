"""Helpers for programs that run *inside* the UML guest (tests/kernel/guest_xfrm.py, bench/xfrm_install.py).

Topology (all netns live on the guest's tmpfs /run/netns):

    podA 10.1.0.10 -veth- 10.1.0.1 nodeA 192.168.50.1 =eth0= 192.168.50.2 nodeB 10.2.0.1 -veth- 10.2.0.10 podB

Also: readers for tcpdump's pcap files and for `ip -s xfrm state|policy` text (ip has no JSON for xfrm), and the
same views of our own decoded SAs/policies, so both can be compared field by field.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import struct
import subprocess
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import XFRM_INF, Mode, PolicyAction, PolicyDir, StateFlag

NODE_A, NODE_B, POD_A, POD_B = "nodeA", "nodeB", "podA", "podB"
_REPO = Path(__file__).resolve().parents[2]
UNDERLAY_A, UNDERLAY_B = ip_address("192.168.50.1"), ip_address("192.168.50.2")
POD_A_IP, POD_B_IP = ip_address("10.1.0.10"), ip_address("10.2.0.10")
POD_NET_A, POD_NET_B = ip_network("10.1.0.0/24"), ip_network("10.2.0.0/24")


async def sh(*args: str, check: bool = True) -> str:
    done = await asyncio.to_thread(subprocess.run, list(args), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def in_ns(netns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *args]


async def ifindex(netns: str, dev: str) -> int:
    out = await sh("ip", "-n", netns, "-o", "link", "show", "dev", dev)
    return int(out.split(":", 1)[0])


async def build_topology() -> None:
    for name in (NODE_A, NODE_B, POD_A, POD_B):
        await sh("ip", "netns", "add", name)
        await sh("ip", "-n", name, "link", "set", "lo", "up")
        # no IPv6 link-local chatter: every frame on the wire is then ours or ARP
        await sh(
            *in_ns(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        )
    await sh("ip", "link", "add", "eth0", "netns", NODE_A, "type", "veth", "peer", "eth0", "netns", NODE_B)
    await sh("ip", "link", "add", "eth0", "netns", POD_A, "type", "veth", "peer", "vpod", "netns", NODE_A)
    await sh("ip", "link", "add", "eth0", "netns", POD_B, "type", "veth", "peer", "vpod", "netns", NODE_B)
    plan = [
        (NODE_A, "eth0", f"{UNDERLAY_A}/24"),
        (NODE_B, "eth0", f"{UNDERLAY_B}/24"),
        (NODE_A, "vpod", "10.1.0.1/24"),
        (NODE_B, "vpod", "10.2.0.1/24"),
        (POD_A, "eth0", f"{POD_A_IP}/24"),
        (POD_B, "eth0", f"{POD_B_IP}/24"),
    ]
    for netns, dev, addr in plan:
        await sh("ip", "-n", netns, "addr", "add", addr, "dev", dev)
        await sh("ip", "-n", netns, "link", "set", dev, "up")
    await sh("ip", "-n", POD_A, "route", "add", "default", "via", "10.1.0.1")
    await sh("ip", "-n", POD_B, "route", "add", "default", "via", "10.2.0.1")
    await sh("ip", "-n", NODE_A, "route", "add", str(POD_NET_B), "via", str(UNDERLAY_B))
    await sh("ip", "-n", NODE_B, "route", "add", str(POD_NET_A), "via", str(UNDERLAY_A))
    for node in (NODE_A, NODE_B):
        await sh(*in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1"))


async def xfrm_stat(netns: str) -> dict[str, int]:
    text = await sh(*in_ns(netns, "cat", "/proc/net/xfrm_stat"))
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def counters_moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved between two reads (xfrm_stat, /metrics, TcpExt ...), by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


async def fast_open_counters(netns: str) -> dict[str, int]:
    """The netns's TCP Fast Open counters (TcpExt TCPFastOpen*, without the prefix): SYNs that carried data and
    were taken ("Active" on the connecting side, "Passive" on the listening one), and their fallbacks."""
    rows = [x.split() for x in (await sh(*in_ns(netns, "cat", "/proc/net/netstat"))).splitlines()
            if x.startswith("TcpExt:")]  # fmt: skip
    return {k[11:]: int(v) for k, v in zip(rows[0], rows[1], strict=True) if k.startswith("TCPFastOpen")}


def ping_counts(text: str) -> tuple[int, int]:
    found = PING_SUMMARY.search(text)
    if not found:
        raise RuntimeError(f"no ping summary in: {text[-300:]!r}")
    return int(found.group(1)), int(found.group(2))


# --- packet capture ---------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """tcpdump on one interface, egress only (-Q out: tunnel mode re-injects the decrypted packet on ingress).

    stop() raises when tcpdump says the kernel dropped frames before it could read them (its ring was full): a
    capture with holes proves nothing about what crossed, so no test may count or search it."""

    netns: str
    dev: str
    path: Path | str
    proc: asyncio.subprocess.Process | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    async def start(self) -> None:
        # -B: on a GSO-capable device (veth) libpcap sizes each ring slot for a 64 KiB packet, so its default
        # 2 MiB buffer holds ~31 frames, and a tcpdump starved of CPU (a busy host, UML) lost up to 127 frames of
        # one burst (tests/kernel/README.md). 32 MiB holds ~500; stop() still refuses a capture with holes.
        argv = in_ns(self.netns, "tcpdump", "-i", self.dev, "-Q", "out", "--immediate-mode", "-U", "-n", "-Z", "root",
                     "-B", "32768")  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *argv, "-w", str(self.path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        assert self.proc.stderr is not None
        line = await asyncio.wait_for(self.proc.stderr.readline(), 30)
        if b"listening on" not in line:
            raise RuntimeError(f"tcpdump on {self.netns}/{self.dev} did not start: {line!r}")

    async def stop(self) -> list[bytes]:
        assert self.proc is not None and self.proc.stderr is not None
        await asyncio.sleep(0.3)  # let the last packets reach the file
        self.proc.send_signal(signal.SIGINT)
        stats = (await asyncio.wait_for(self.proc.stderr.read(), 30)).decode(errors="replace")
        await asyncio.wait_for(self.proc.wait(), 30)
        found = re.search(r"(\d+) packets? dropped by kernel", stats)
        if not found:
            raise RuntimeError(f"tcpdump on {self.netns}/{self.dev} gave no statistics: {stats!r}")
        if int(found.group(1)):
            raise RuntimeError(f"tcpdump on {self.netns}/{self.dev}: the kernel dropped {found.group(1)} frames "
                               "before tcpdump read them; this capture cannot be judged")  # fmt: skip
        return read_pcap(Path(self.path))


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    frames = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from(f"{endian}IIII", data, offset)
        frames.append(data[offset + 16 : offset + 16 + caplen])
        offset += 16 + caplen
    return frames


@dataclass
class Traffic:
    esp: int = 0
    icmp: int = 0
    other_ip: int = 0
    non_ip: int = 0
    pattern_frames: int = 0
    esp_by_spi: collections.Counter[int] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "esp": self.esp,
            "icmp": self.icmp,
            "other_ip": self.other_ip,
            "non_ip": self.non_ip,
            "pattern_frames": self.pattern_frames,
            "esp_by_spi": {f"0x{k:08x}": v for k, v in sorted(self.esp_by_spi.items())},
        }


def classify(frames: list[bytes], pattern: bytes) -> Traffic:
    t = Traffic()
    for frame in frames:
        if pattern in frame:
            t.pattern_frames += 1
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            proto = frame[14 + 9]
            if proto == 50:
                t.esp += 1
                t.esp_by_spi[struct.unpack_from("!I", frame, 14 + ihl)[0]] += 1
            elif proto == 1:
                t.icmp += 1
            else:
                t.other_ip += 1
        elif ethertype == 0x86DD:
            t.other_ip += 1
        else:
            t.non_ip += 1
    return t


# --- `ip -s xfrm` text --------------------------------------------------------------------------------------------

_LIMIT = r"(\(INF\)|\d+)"


def _limit(text: str) -> int:
    return XFRM_INF if text == "(INF)" else int(text)


def _mark(text: str) -> str:
    value, _, mask = text.partition("/")
    return f"{int(value, 16):#x}/{int(mask or '0xffffffff', 16):#x}"


def _blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            blocks.append([])
        blocks[-1].append(line.strip())
    return blocks


def parse_ip_states(text: str) -> list[dict[str, Any]]:
    """`ip -s xfrm state` (iproute2 6.1) into the same view as sa_view()."""
    out = []
    for block in _blocks(text):
        head = block[0].split()
        view: dict[str, Any] = {"src": head[1], "dst": head[3], "mark": None, "output_mark": None, "if_id": 0}
        view.update({"flags": [], "aead": None, "esn_window": None, "bmp_len": None, "offload": None, "sel": None})
        lines = iter(block[1:])
        for line in lines:
            if match := re.match(r"proto (\S+) spi (0x[0-9a-f]+)\S* reqid (\d+)\S* mode (\S+)", line):
                view.update(proto=match[1], spi=int(match[2], 16), reqid=int(match[3]), mode=match[4])
            elif match := re.match(r"replay-window (\d+)(?: seq \S+)?(?: flag (.*?))?(?: \(0x[0-9a-f]+\))?$", line):
                view["replay_window_field"] = int(match[1])
                view["flags"] = sorted((match[2] or "").split())
            elif line.startswith("mark ") or line.startswith("output-mark "):
                for key, value in re.findall(r"(output-mark|mark) (\S+)", line):
                    view["output_mark" if key == "output-mark" else "mark"] = _mark(value)
            elif match := re.match(r"aead (\S+) 0x([0-9a-f]+)(?: \((\d+) bits\))? (\d+)$", line):
                view["aead"] = {"name": match[1], "key_hex": match[2], "icv": int(match[4])}
            elif line.startswith("replay_window ") and "bitmap-length" in line:
                nums = re.findall(r"\d+", line)
                view["esn_window"], view["bmp_len"] = int(nums[0]), int(nums[1])
            elif match := re.match(r"if_id (0x[0-9a-f]+)", line):
                view["if_id"] = int(match[1], 16)
            elif match := re.match(r"sel src (\S+) dst (\S+)(.*)$", line):
                view["sel"] = f"{match[1]} -> {match[2]}"
            elif match := re.match(r"crypto offload parameters: dev (\S+) dir (\S+)", line):
                view["offload"] = f"{match[1]} {match[2]}"
            elif match := re.match(rf"limit: soft {_LIMIT}\(bytes\), hard {_LIMIT}\(bytes\)", line):
                view["bytes"] = (_limit(match[1]), _limit(match[2]))
            elif match := re.match(rf"limit: soft {_LIMIT}\(packets\), hard {_LIMIT}\(packets\)", line):
                view["packets"] = (_limit(match[1]), _limit(match[2]))
            elif match := re.match(r"expire add: soft (\d+)\(sec\), hard (\d+)\(sec\)", line):
                view["add_seconds"] = (int(match[1]), int(match[2]))
            elif match := re.match(r"(\d+)\(bytes\), (\d+)\(packets\)", line):
                view["current"] = (int(match[1]), int(match[2]))
            elif match := re.match(r"dir (in|out)$", line):
                view["dir"] = match[1]
        out.append(view)
    return out


def sa_view(info: m.SaInfo, ifnames: dict[int, str] | None = None) -> dict[str, Any]:
    sa = info.sa
    lt = sa.lifetime
    esn_attr = info.replay is not None and not info.replay.legacy
    view: dict[str, Any] = {
        "src": str(sa.src),
        "dst": str(sa.dst),
        "proto": {50: "esp", 51: "ah"}.get(sa.proto, str(sa.proto)),
        "spi": sa.spi,
        "reqid": sa.reqid,
        "mode": Mode(sa.mode).name.lower(),
        "replay_window_field": 0 if esn_attr else sa.replay_window,
        "flags": sorted(str(f.name).lower() for f in StateFlag if f in (sa.flags | (StateFlag.ESN if sa.esn else 0))),
        "mark": _mark(f"{sa.mark.value:#x}/{sa.mark.mask:#x}") if sa.mark else None,
        "output_mark": _mark(f"{sa.output_mark.value:#x}/{sa.output_mark.mask:#x}") if sa.output_mark else None,
        "if_id": sa.if_id,
        "aead": None,
        "esn_window": info.replay.replay_window if info.replay and esn_attr else None,
        "bmp_len": info.replay.bmp_len if info.replay and esn_attr else None,
        "offload": None,
        "sel": f"{sa.selector.src} -> {sa.selector.dst}",
        "bytes": (lt.soft_bytes, lt.hard_bytes),
        "packets": (lt.soft_packets, lt.hard_packets),
        "add_seconds": (lt.soft_add_seconds, lt.hard_add_seconds),
        "current": (info.current.bytes, info.current.packets),
    }
    if sa.aead is not None:
        view["aead"] = {"name": sa.aead.name, "key_hex": (sa.aead.key + sa.aead.salt).hex(), "icv": sa.aead.icv_bits}
    if sa.offload is not None:
        name = (ifnames or {}).get(sa.offload.ifindex, str(sa.offload.ifindex))
        view["offload"] = f"{name} {'in' if sa.offload.inbound else 'out'}"
    if sa.direction is not None:
        view["dir"] = sa.direction.name.lower()
    return view


def parse_ip_policies(text: str) -> list[dict[str, Any]]:
    """`ip -s xfrm policy` (iproute2 6.1) into the same view as policy_view()."""
    out = []
    for block in _blocks(text):
        head = re.match(r"src (\S+) dst (\S+)", block[0])
        assert head, block[0]
        view: dict[str, Any] = {"sel": f"{head[1]} -> {head[2]}", "mark": None, "if_id": 0, "tmpls": []}
        for line in block[1:]:
            if match := re.match(r"dir (\S+) action (\S+) index (\d+) priority (\d+) ptype (\S+) share (\S+)", line):
                view.update(dir=match[1], action=match[2], index=int(match[3]), priority=int(match[4]))
                view.update(ptype=match[5], share=match[6])
            elif match := re.match(r"mark (\S+)", line):
                view["mark"] = _mark(match[1])
            elif match := re.match(r"if_id (0x[0-9a-f]+)", line):
                view["if_id"] = int(match[1], 16)
            elif match := re.match(r"tmpl src (\S+) dst (\S+)", line):
                view["tmpls"].append({"src": match[1], "dst": match[2]})
            elif match := re.match(r"proto (\S+) spi (0x[0-9a-f]+)\S* reqid (\d+)\S* mode (\S+)", line):
                view["tmpls"][-1].update(proto=match[1], spi=int(match[2], 16), reqid=int(match[3]), mode=match[4])
            elif match := re.match(r"level (\S+) share (\S+)", line):
                view["tmpls"][-1].update(level=match[1], share=match[2])
            elif match := re.match(rf"limit: soft {_LIMIT}\(bytes\), hard {_LIMIT}\(bytes\)", line):
                view["bytes"] = (_limit(match[1]), _limit(match[2]))
            elif match := re.match(rf"limit: soft {_LIMIT}\(packets\), hard {_LIMIT}\(packets\)", line):
                view["packets"] = (_limit(match[1]), _limit(match[2]))
        out.append(view)
    return out


def _endpoint(addr: object, family: int) -> str:
    if addr is not None:
        return str(addr)
    return "::" if family == 10 else "0.0.0.0"  # noqa: S104 (an address to print, nothing binds)


def policy_view(info: m.PolicyInfo) -> dict[str, Any]:
    p = info.policy
    return {
        "sel": f"{p.selector.src} -> {p.selector.dst}",
        "dir": PolicyDir(p.direction).name.lower(),
        "action": PolicyAction(p.action).name.lower(),
        "index": p.index,
        "priority": p.priority,
        "ptype": p.ptype.name.lower(),
        "share": p.share.name.lower(),
        "mark": _mark(f"{p.mark.value:#x}/{p.mark.mask:#x}") if p.mark else None,
        "if_id": p.if_id,
        "bytes": (p.lifetime.soft_bytes, p.lifetime.hard_bytes),
        "packets": (p.lifetime.soft_packets, p.lifetime.hard_packets),
        "tmpls": [
            {
                "src": _endpoint(t.src, t.family),
                "dst": _endpoint(t.dst, t.family),
                "proto": {50: "esp", 51: "ah"}.get(t.proto, str(t.proto)),
                "spi": t.spi,
                "reqid": t.reqid,
                "mode": Mode(t.mode).name.lower(),
                "level": "use" if t.optional else "required",
                "share": t.share.name.lower(),
            }
            for t in p.templates
        ],
    }


def without_keys(view: dict[str, Any]) -> dict[str, Any]:
    out = dict(view)
    if isinstance(out.get("aead"), dict):
        out["aead"] = {k: v for k, v in out["aead"].items() if k != "key_hex"}
    return out


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Pair objects by `key` and diff them; key material is compared here and never leaves the guest."""
    by_key = {str(v[key]): v for v in theirs}
    result: dict[str, Any] = {"missing_in_ip": [], "extra_in_ip": [], "diffs": {}, "compared": 0, "fields": 0}
    for view in ours:
        other = by_key.pop(str(view[key]), None)
        if other is None:
            result["missing_in_ip"].append(str(view[key]))
            continue
        ours_v, theirs_v = dict(view), dict(other)
        if isinstance(ours_v.get("aead"), dict) and isinstance(theirs_v.get("aead"), dict):
            same_key = ours_v["aead"].pop("key_hex") == theirs_v["aead"].pop("key_hex")
            ours_v["aead_key_equal"], theirs_v["aead_key_equal"] = True, same_key
        diff = {
            k: [ours_v.get(k), theirs_v.get(k)]
            for k in sorted(set(ours_v) | set(theirs_v))
            if ours_v.get(k) != theirs_v.get(k)
        }
        if diff:
            result["diffs"][str(view[key])] = diff
        result["compared"] += 1
        result["fields"] += len(ours_v)
    result["extra_in_ip"] = sorted(by_key)
    return result


# --- the raw TLS peer that bridge set-up latency is measured against (tests/kernel, bench/ondemand_scale.py) ---

MTLS_SERVER = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(sys.argv[1], sys.argv[2]); ctx.load_verify_locations(sys.argv[1])
ctx.verify_mode = ssl.CERT_REQUIRED; ctx.num_tickets = 0
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7443)); s.listen(8)
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    with ctx.wrap_socket(c, server_side=True) as t:
        t.recv(1)
"""

MTLS_CLIENT = """
import socket, ssl, sys, time
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(sys.argv[1]); ctx.check_hostname = False; ctx.load_cert_chain(sys.argv[1], sys.argv[4])
out = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    with ctx.wrap_socket(socket.create_connection((sys.argv[2], 7443), 5)) as t:
        t.getpeercert()
        out.append((time.perf_counter() - t0) * 1000)
        t.send(b"x")
print(" ".join("%.2f" % x for x in out))
"""


# The same handshake with the bridges' own TLS stack: pyOpenSSL on the OpenSSL that `cryptography` ships (its
# default key exchange, X25519MLKEM768 first), contexts from ipsec_bridge.handshake.tls_context, and an SVID chain
# as ztd issues (a P-256 leaf with a SPIFFE URI, signed by a P-256 CA) verified on both ends. Blocking sockets.
_STACK_CONTEXT = """
import datetime as dt, sys
from cryptography import x509
from ipsec_bridge.handshake import Credential, tls_context
from ztcore.identity import Identity
def context(ca, crt, key):
    pem = open(crt, "rb").read()
    leaf = x509.load_pem_x509_certificate(pem)
    uri = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    spiffe = uri.get_values_for_type(x509.UniformResourceIdentifier)[0]
    return tls_context(Credential(Identity.parse(spiffe), pem, open(key, "rb").read(), open(ca, "rb").read(),
                                  leaf.not_valid_after_utc))
"""

MTLS_STACK_SERVER = (
    _STACK_CONTEXT
    + """
import socket
from OpenSSL import SSL
ctx = context(*sys.argv[1:4])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7444)); s.listen(8)
print("ready", flush=True)
for _ in range(int(sys.argv[4])):
    c, _ = s.accept()
    t = SSL.Connection(ctx, c); t.set_accept_state(); t.do_handshake()
    t.recv(1)
    c.close()
"""
)

MTLS_STACK_CLIENT = (
    _STACK_CONTEXT
    + """
import socket, time
from OpenSSL import SSL
ctx = context(*sys.argv[1:4])
out = []
for _ in range(int(sys.argv[5])):
    t0 = time.perf_counter()
    c = socket.create_connection((sys.argv[4], 7444), 5)
    c.setblocking(True)  # pyOpenSSL reads the fd itself: no timeout mode
    t = SSL.Connection(ctx, c); t.set_connect_state(); t.do_handshake()
    assert t.get_peer_certificate() is not None
    out.append((time.perf_counter() - t0) * 1000)
    t.send(b"x")
    c.close()
print(" ".join("%.2f" % x for x in out))
"""
)


def make_svids(workdir: Path) -> dict[str, Path]:
    """bench/rekey_resumption.py's two SVIDs of one P-256 CA (client and server), as PEM files in `workdir`."""
    import os

    from bench.rekey_resumption import credentials

    client, server = credentials().values()
    files = {"ca": workdir / "svid-ca.crt"}
    files["ca"].write_bytes(client.roots_pem)
    for who, cred in (("client", client), ("server", server)):
        files[f"{who}_crt"], files[f"{who}_key"] = workdir / f"svid-{who}.crt", workdir / f"svid-{who}.key"
        files[f"{who}_crt"].write_bytes(cred.chain_pem)
        fd = os.open(files[f"{who}_key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cred.key_pem)
    return files


def make_cert(crt: Path, key_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


async def ready_server(netns: str, script: str, *args: str, site: bool = False) -> asyncio.subprocess.Process:
    """`python -S -c script args` in `netns` (without -S if `site`: it imports installed packages), once it has
    printed its "ready" line."""
    import sys

    server = await asyncio.create_subprocess_exec(
        *in_ns(netns, sys.executable, *([] if site else ["-S"]), "-c", script, *args), stdout=asyncio.subprocess.PIPE
    )
    assert server.stdout is not None
    line = await asyncio.wait_for(server.stdout.readline(), 30)
    assert line.strip() == b"ready", line
    return server


async def raw_mtls_ms(client_ns: str, server_ns: str, server_ip: str, count: int, workdir: Path) -> list[float]:
    """`count` mutual TLS 1.3 handshakes (ECDSA P-256, as the bridges' SVIDs; one self-signed cert on both ends,
    no tickets) from `client_ns` to `server_ns`, one at a time; each one's milliseconds."""
    import sys

    crt, key = workdir / "tls.crt", workdir / "tls.key"
    if not await asyncio.to_thread(crt.exists):
        await asyncio.to_thread(make_cert, crt, key)
    server = await ready_server(server_ns, MTLS_SERVER, str(crt), str(key), str(count))
    out = await sh(*in_ns(client_ns, sys.executable, "-S", "-c", MTLS_CLIENT, str(crt), server_ip, str(count),
                          str(key)))  # fmt: skip
    await asyncio.wait_for(server.wait(), 30)
    return [float(x) for x in out.split()]


async def stack_mtls_ms(client_ns: str, server_ns: str, server_ip: str, count: int, workdir: Path) -> list[float]:
    """As raw_mtls_ms, with the bridges' TLS stack and an SVID chain on each end (MTLS_STACK_SERVER)."""
    import sys

    f = await asyncio.to_thread(make_svids, workdir)
    server = await ready_server(server_ns, MTLS_STACK_SERVER, str(f["ca"]), str(f["server_crt"]), str(f["server_key"]),
                                str(count), site=True)  # fmt: skip
    out = await sh(*in_ns(client_ns, sys.executable, "-c", MTLS_STACK_CLIENT, str(f["ca"]), str(f["client_crt"]),
                          str(f["client_key"]), server_ip, str(count)))  # fmt: skip
    await asyncio.wait_for(server.wait(), 30)
    return [float(x) for x in out.split()]


# One process inside `relA` (the netns of its own that `held_release_ms` makes): a trap (an out policy whose
# template no SA satisfies) holds a TCP SYN, then an UPDPOLICY puts a policy whose SA exists in the trap's slot,
# as the bridge's switch does; the time from that request's answer to the connect completing is the kernel's
# release of what it held (xfrm_policy_requeue runs the queue from a timer set to the current jiffy) plus the SYN's
# round trip. The SA is a transport-mode ESP one, also in relB, so the SYN goes out encrypted as the bridge's would.
HELD_RELEASE = """
import asyncio, os, random, secrets, socket, sys, time
from ipaddress import ip_address
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import Mode, PolicyDir
from ipsec_bridge.xfrm.netlink import XfrmSocket

async def main(count):
    with open("/proc/sys/net/core/xfrm_larval_drop", "w") as f:
        f.write("0")  # relA's own: hold first packets, as the bridge sets it
    here, there = await XfrmSocket.open(), await XfrmSocket.open("relB")
    sel = m.Selector.of("10.99.0.1/32", "10.99.0.2/32")
    sel = m.Selector(sel.src, sel.dst, 6, 0, 0, 5000, 0xFFFF)
    key = m.Aead(secrets.token_bytes(16), secrets.token_bytes(4))
    sa = m.SecurityAssociation(ip_address("10.99.0.1"), ip_address("10.99.0.2"), 0x1234, key, sel, reqid=7,
                               mode=Mode.TRANSPORT)
    await here.add_sa(sa)
    await there.add_sa(sa)

    def out(reqid):
        tmpl = (m.Template(None, None, reqid=reqid, mode=Mode.TRANSPORT),)
        return m.Policy(sel, PolicyDir.OUT, priority=100, templates=tmpl)

    loop = asyncio.get_running_loop()
    times = []
    for _ in range(count):
        await here.add_policy(out(99), update=True)  # the trap: no SA has reqid 99
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("10.99.0.2", 5000))
        except BlockingIOError:
            pass
        await asyncio.sleep(0.02 + random.random() * 0.02)  # held; released at a moment unrelated to the ticks
        start = time.perf_counter()
        await here.add_policy(out(7), update=True)
        done = loop.create_future()
        loop.add_writer(s.fileno(), lambda: done.done() or done.set_result(None))
        await asyncio.wait_for(done, 5)
        ms = (time.perf_counter() - start) * 1000
        loop.remove_writer(s.fileno())
        ok = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        s.close()
        times.append(ms if ok else -1.0)
    print(" ".join(f"{t:.3f}" for t in times))

asyncio.run(main(int(sys.argv[1])))
"""

HELD_RELEASE_SERVER = """
import socket, sys
s = socket.socket()
s.bind(("10.99.0.2", 5000))
s.listen(1024)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


async def held_release_ms(count: int) -> list[float]:
    """`count` times: the milliseconds from the UPDPOLICY that replaces a trap holding a TCP SYN to that connect
    completing (the kernel's release of a held first packet, the floor under every on-demand first connection),
    in two netns of their own (relA, relB), removed afterwards. -1 for a connect that failed."""
    import sys

    for ns in ("relA", "relB"):
        await sh("ip", "netns", "add", ns)
    try:
        await sh("ip", "link", "add", "rel0", "netns", "relA", "type", "veth", "peer", "name", "rel1", "netns", "relB")
        for ns, dev, addr in (("relA", "rel0", "10.99.0.1/24"), ("relB", "rel1", "10.99.0.2/24")):
            await sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            await sh("ip", "-n", ns, "link", "set", dev, "up")
        server = await ready_server("relB", HELD_RELEASE_SERVER)
        try:
            out = await sh(*in_ns("relA", "env", f"PYTHONPATH={_REPO}", sys.executable, "-c", HELD_RELEASE,
                                  str(count)))  # fmt: skip
        finally:
            server.kill()
            await server.wait()
        return [float(x) for x in out.split()]
    finally:
        for ns in ("relA", "relB"):
            await sh("ip", "netns", "del", ns, check=False)
