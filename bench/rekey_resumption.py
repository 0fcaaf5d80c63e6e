"""Rekeys per second, resumed (TLS 1.3 psk_dhe_ke) vs full, beside raw TLS 1.3 full vs resumed handshakes/s.

    .venv/bin/python bench/rekey_resumption.py [--rekeys 300] [--rounds 5] [--json]

Host only, one process, one core's worth of Python: both ends run here, so every figure pays for the client
and the server. Certificates: a self-made ECDSA P-256 CA and two P-256 SVIDs with SPIFFE URIs (what ztd issues);
both contexts come from `ipsec_bridge.handshake.tls_context`, as the bridge builds them.

- raw TLS: pyOpenSSL over memory BIOs, no sockets, no protocol: `rekeys` full handshakes (no session offered),
  then `rekeys` resumed ones (each offers the session the previous one left, as the bridge chains them).
- ours: the bridge's exchange (`handshake.initiate` / `handshake.respond`: preamble, TLS, identity and policy
  checks, SPI exchange, exporter keys) over loopback TCP, one rekey after another, with an installer that only
  hands out SPIs (the XFRM cost is bench/rekey_scale.py's figure). Full: no ticket; resumed: the ticket of the
  previous rekey (the N-resumptions bound is not applied here, so every resumed rekey resumes).
Per mode: the median of `rounds` rounds, and the signatures each side made per handshake (CertificateVerify).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import statistics
import sys
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipsec_bridge import handshake as hs  # noqa: E402 (after the sys.path line)
from ipsec_bridge.keys import KeyScope  # noqa: E402
from ipsec_bridge.xfrm.messages import Aead  # noqa: E402
from ztcore.identity import Identity  # noqa: E402

A, B = "spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/payments/sa/ledger"
A_IP, B_IP = "10.1.0.10", "10.2.0.10"


def credentials() -> dict[str, hs.Credential]:
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")])
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    out = {}
    for serial, uri in enumerate((A, B), start=2):
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        out[uri] = hs.Credential(
            Identity.parse(uri), leaf.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            ca.public_bytes(pem), now + dt.timedelta(hours=1),
        )  # fmt: skip
    return out


# --- raw TLS 1.3 -------------------------------------------------------------------------------------------------


def raw_handshake(client: SSL.Context, server: SSL.Context, session: SSL.Session | None) -> tuple[SSL.Session, bool]:
    c, s = SSL.Connection(client), SSL.Connection(server)
    trace = hs.HandshakeTrace()  # tls_context's message callback fills it: resumed or not, which key exchange
    c.set_app_data(trace)
    c.set_connect_state()
    s.set_accept_state()
    if session is not None:
        c.set_session(session)
    done = [False, False]
    while not all(done):
        for i, conn in enumerate((c, s)):
            if not done[i]:
                try:
                    conn.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((c, s), (s, c)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(1 << 16))
    # the server's NewSessionTicket reaches the client with the first bytes after the handshake
    s.send(b"x")
    c.bio_write(s.bio_read(1 << 16))
    c.recv(16)
    resumed = trace.mode == "psk_dhe_ke"
    assert resumed == (session is not None), trace.mode
    new = c.get_session()
    c.shutdown()  # close_notify keeps the session resumable
    assert new is not None
    return new, bool(resumed)


def raw_rate(creds: dict[str, hs.Credential], n: int, resumed: bool) -> float:
    client, server = hs.tls_context(creds[A]), hs.tls_context(creds[B])
    session, _ = raw_handshake(client, server, None)
    started = time.perf_counter()
    for _ in range(n):
        new, _ = raw_handshake(client, server, session if resumed else None)
        session = new if resumed else session
    return n / (time.perf_counter() - started)


# --- ours ----------------------------------------------------------------------------------------------------------


class SpiOnly:
    def __init__(self, base: int) -> None:
        self._spis = itertools.count(base)

    async def allocate_spi(self) -> int:
        return next(self._spis)

    def propose_spi(self) -> int:
        return next(self._spis)

    async def install(
        self, inbound: tuple[int, Aead] | None, outbound: tuple[int, Aead] | None, *, esn: bool = True
    ) -> None:
        return None

    async def rollback(self) -> None:
        return None


async def our_rate(creds: dict[str, hs.Credential], n: int, resume: bool) -> tuple[float, list[int]]:
    ctx_a, ctx_b = hs.tls_context(creds[A]), hs.tls_context(creds[B])
    a, b = ip_address(A_IP), ip_address(B_IP)
    preamble = hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, A_IP, B_IP)
    r_plan = hs.Plan(creds[B], ctx_b, Identity.parse(A), a, b, SpiOnly(0x10_0000), lambda: None)
    signatures: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result = await hs.respond(reader, writer, await hs.read_preamble(reader), r_plan)
            signatures.append(result.signatures)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    i_installer = SpiOnly(0x20_0000)
    ticket: hs.Ticket | None = None

    async def one(offer: hs.Ticket | None) -> hs.Result:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            plan = hs.Plan(creds[A], ctx_a, Identity.parse(B), a, b, i_installer, lambda: None, ticket=offer)
            return await hs.initiate(reader, writer, preamble, plan)
        finally:
            writer.close()

    ticket = (await one(None)).ticket  # generation 1 (untimed)
    signatures.clear()
    resumed = 0
    started = time.perf_counter()
    for _ in range(n):
        result = await one(ticket if resume else None)
        resumed += result.resumed
        signatures.append(result.signatures)
        ticket = result.ticket if resume else ticket
    seconds = time.perf_counter() - started
    server.close()
    await server.wait_closed()
    assert resumed == (n if resume else 0), f"{resumed} of {n} resumed"
    return n / seconds, signatures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rekeys", type=int, default=300, help="handshakes per mode and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    creds = credentials()
    rates: dict[str, list[float]] = {"raw_full": [], "raw_resumed": [], "ours_full": [], "ours_resumed": []}
    sigs: dict[str, float] = {}
    for _ in range(args.rounds):
        rates["raw_full"].append(raw_rate(creds, args.rekeys, resumed=False))
        rates["raw_resumed"].append(raw_rate(creds, args.rekeys, resumed=True))
        for mode, resume in (("ours_full", False), ("ours_resumed", True)):
            rate, signatures = asyncio.run(our_rate(creds, args.rekeys, resume))
            rates[mode].append(rate)
            sigs[mode] = sum(signatures) / len(signatures)  # both sides' results: signatures per side per rekey
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    out: dict[str, Any] = {
        "rekeys_per_round": args.rekeys,
        "rounds": args.rounds,
        "median_per_second": med,
        "min_max": {k: [round(min(v), 1), round(max(v), 1)] for k, v in rates.items()},
        "signatures_per_side_per_rekey": sigs,
        "resumed_over_full": {
            "raw": round(med["raw_resumed"] / med["raw_full"], 2),
            "ours": round(med["ours_resumed"] / med["ours_full"], 2),
        },
        "ours_over_raw": {
            "full": round(med["ours_full"] / med["raw_full"], 2),
            "resumed": round(med["ours_resumed"] / med["raw_resumed"], 2),
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in med.items():
        lo, hi = out["min_max"][k]
        print(f"{k:14s} {v:8.1f}/s  ({lo}-{hi})")
    print("signatures per side per rekey:", sigs)
    print("resumed/full:", out["resumed_over_full"], " ours/raw:", out["ours_over_raw"])


if __name__ == "__main__":
    main()
