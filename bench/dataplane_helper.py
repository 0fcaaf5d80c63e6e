"""Helpers for bench/dataplane.sh (not a benchmark by itself).

    dataplane_helper.py certs DIR              CA root + two SVIDs (client, server) as PEM files (keys 0600)
    dataplane_helper.py ipsec POD_A POD_B      one real zt-bridge pod-scope handshake between netns bench-a and
                                               bench-b (TLS 1.3 + exporter keys + SA/SP install through
                                               ipsec_bridge.sa_manager); the SAs stay in the kernel
    dataplane_helper.py sink ADDR PORT OUT     accept one TCP connection, count bytes to EOF, write the count
    dataplane_helper.py source HOST PORT SECS [BIND]   send zeros for SECS seconds (the iperf3 fallback)
    dataplane_helper.py summary FILE           read the result lines the script collected and print the table

Result lines (one per run, written by the script): MODE BYTES SECONDS BUSY_TICKS TICKS_PER_SECOND.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import statistics
import sys
import tempfile
import time
from ipaddress import IPv4Address, ip_network
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("plain", "ipsec", "envoy")
LABELS = {
    "plain": "plaintext TCP (veth)",
    "ipsec": "kernel IPsec, bridge-programmed (ESP AES-GCM-128)",
    "envoy": "Envoy mTLS sidecar pair (TLS 1.3)",
}


def write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def certs(out: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from sds.ca import keyring, signer
    from ztcore.identity import Identity
    from ztcore.identity.caclient import private_key_pem

    now = dt.datetime.now(dt.UTC)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    material = keyring.load_or_create(
        None, out / "ca", algorithm="ecdsa-p256", trust_domain="cluster.local",
        self_signed_ttl=dt.timedelta(days=1), now=now,
    )  # fmt: skip
    write_private(out / "root.pem", material.root_bundle_pem.encode(), 0o644)
    for name in ("client", "server"):
        identity = Identity("cluster.local", "bench", name)
        key = ec.generate_private_key(ec.SECP256R1())
        chain = signer.sign(key.public_key(), [identity.uri], dt.timedelta(hours=2), material, now)
        write_private(out / f"{name}.pem", "".join(chain).encode(), 0o644)
        write_private(out / f"{name}.key", private_key_pem(key), 0o600)


async def ipsec(pod_a: IPv4Address, pod_b: IPv4Address) -> None:
    from bench.tunnels import ID_A, ID_B, NODE_A, NODE_B, PORT, Side, credentials, installer, plan
    from ipsec_bridge import handshake as hs
    from ipsec_bridge.keys import KeyScope
    from ipsec_bridge.netns import Netns
    from ipsec_bridge.sa_manager import SaManager, SaSettings
    from ipsec_bridge.xfrm.netlink import XfrmSocket

    with tempfile.TemporaryDirectory() as tmp:
        cred_a, cred_b = await asyncio.to_thread(credentials, Path(tmp))
    sides = {}
    for name, cred, local, peer, pod in (("a", cred_a, NODE_A, NODE_B, pod_a), ("b", cred_b, NODE_B, NODE_A, pod_b)):
        xfrm = await XfrmSocket.open(f"bench-{name}")
        sa = SaManager(xfrm, SaSettings(mesh_cidrs=(ip_network("10.0.0.0/8"),)))
        await sa.start()
        await sa.set_local_pods([pod])
        sides[name] = Side(
            Netns(f"bench-{name}"), xfrm, sa, cred, await asyncio.to_thread(hs.tls_context, cred), local, peer
        )
    a, b = sides["a"], sides["b"]
    responded: asyncio.Future[hs.Result] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pre = await hs.read_preamble(reader)
            src, dst = pre.addresses()
            assert isinstance(src, IPv4Address) and isinstance(dst, IPv4Address)
            responded.set_result(await hs.respond(reader, writer, pre, plan(b, ID_A, installer(b, dst, src), src, dst)))
        except Exception as err:  # reported by the initiator's wait below
            if not responded.done():
                responded.set_exception(err)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, sock=await b.netns.listen(str(NODE_B), PORT))
    reader, writer = await a.netns.connect(str(NODE_B), PORT, 30)
    try:
        pre = hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, str(pod_a), str(pod_b))
        result = await hs.initiate(reader, writer, pre, plan(a, ID_B, installer(a, pod_a, pod_b), pod_a, pod_b))
    finally:
        writer.close()
    await asyncio.wait_for(responded, 30)
    server.close()
    for s in sides.values():
        s.sa.close()
        s.xfrm.close()
        s.netns.close()
    print(f"ipsec: tunnel {pod_a} <-> {pod_b} up, SPI in 0x{result.spi_in:08x} out 0x{result.spi_out:08x}")


def sink(port: int, out: Path, bind: str) -> None:
    with socket.create_server((bind, port)) as srv:
        Path(f"{out}.ready").touch()
        conn, _ = srv.accept()
        total = 0
        with conn:
            while chunk := conn.recv(1 << 18):
                total += len(chunk)
    out.write_text(str(total))


def source(host: str, port: int, seconds: float, bind: str | None) -> None:
    buf = bytes(1 << 17)
    with socket.create_connection((host, port), timeout=30, source_address=(bind, 0) if bind else None) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(buf)


def summary(path: Path) -> int:
    rows: dict[str, list[tuple[float, float]]] = {}
    for line in path.read_text().splitlines():
        mode, nbytes, secs, busy, hz = line.split()
        runs = rows.setdefault(mode, [])
        if int(nbytes) > 0:
            gbits = int(nbytes) * 8 / float(secs) / 1e9
            cpu_ns_per_byte = int(busy) / int(hz) * 1e9 / int(nbytes)
            runs.append((gbits, cpu_ns_per_byte))
    med = {m: (statistics.median(g for g, _ in r), statistics.median(c for _, c in r)) for m, r in rows.items() if r}
    for mode in [m for m in MODES if m in rows]:
        r = rows[mode]
        if not r:
            print(f"  {LABELS[mode]:<52} no successful run")
            continue
        g = [x for x, _ in r]
        print(
            f"  {LABELS[mode]:<52} {med[mode][0]:7.3f} Gbit/s (min {min(g):.3f}, max {max(g):.3f}, {len(r)} runs);"
            f" CPU {med[mode][1]:6.2f} ns/byte"
        )
    if "plain" in med:
        for mode in ("ipsec", "envoy"):
            if mode in med:
                print(
                    f"  {mode} vs plaintext: {med[mode][0] / med['plain'][0]:.2f}x the throughput,"
                    f" {med[mode][1] / med['plain'][1]:.2f}x the CPU per byte"
                )
    if "ipsec" in med and "envoy" in med:
        print(
            f"  kernel IPsec vs Envoy mTLS: {med['ipsec'][0] / med['envoy'][0]:.2f}x the throughput,"
            f" {med['ipsec'][1] / med['envoy'][1]:.2f}x the CPU per byte"
        )
    return 0 if rows and all(rows.values()) else 1


def main(argv: list[str]) -> int:
    try:
        match argv:
            case ["certs", out]:
                certs(Path(out))
            case ["ipsec", pod_a, pod_b]:
                asyncio.run(ipsec(IPv4Address(pod_a), IPv4Address(pod_b)))
            case ["sink", bind, port, out]:
                sink(int(port), Path(out), bind)
            case ["source", host, port, secs, *bind]:
                source(host, int(port), float(secs), bind[0] if bind else None)
            case ["summary", path]:
                return summary(Path(path))
            case _:
                print(__doc__, file=sys.stderr)
                return 2
    except Exception as err:  # one readable line for the shell script
        print(f"dataplane_helper {argv[0]}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
