"""Certificates per second on one core through the real path, beside openssl's ECDSA P-256 ceiling.

ztd runs as its own process pinned to CPU 0 (`taskset`), with its self-signed ECDSA P-256 CA. A load
process pinned to CPU 1 keeps many CreateCertificate calls in flight over TLS port 15012, each with a bearer
token from the embedded issuer and a fresh ECDSA P-256 CSR (from a pre-generated pool, so client key
generation is not measured). In the same run, `openssl speed ecdsap256` gives sign/s and verify/s on one
core; the ceiling for "verify the CSR + sign the certificate" is 1 / (1/sign + 1/verify).

    .venv/bin/python bench/ca.py [--rounds 5] [--seconds 8] [--inflight 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return (
        ["taskset", "-c", str(cpu), *argv]
        if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1
        else argv
    )  # type: ignore[operator]


def openssl_ceiling(seconds: int) -> tuple[float, float, float]:
    out = subprocess.run(
        pinned(0, ["openssl", "speed", "-seconds", str(seconds), "ecdsap256"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", out)
    if not match:
        raise SystemExit(f"cannot parse openssl speed output:\n{out}")
    sign, verify = float(match.group(1)), float(match.group(2))
    return sign, verify, 1.0 / (1.0 / sign + 1.0 / verify)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LOAD = r"""
import asyncio, json, sys, time
import grpc
sys.path.insert(0, sys.argv[1])
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
cfg = json.loads(sys.argv[2])
csrs = cfg["csrs"]

async def main():
    creds = grpc.ssl_channel_credentials(cfg["root"].encode())
    opts = [("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
    async with grpc.aio.secure_channel(cfg["address"], creds, options=opts) as ch:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        md = [("authorization", "Bearer " + cfg["token"])]
        done = 0
        failed = 0
        stop_at = 0.0
        async def worker(i):
            nonlocal done, failed
            n = i
            while time.monotonic() < stop_at:
                try:
                    if cfg["mode"] == "ca":
                        req = ca_pb2.IstioCertificateRequest(csr=csrs[n % len(csrs)])
                        await stub.CreateCertificate(req, metadata=md)
                    else:
                        await health.Check(health_pb2.HealthCheckRequest(), metadata=md)
                    done += 1
                except grpc.aio.AioRpcError:
                    failed += 1
                n += cfg["inflight"]
        stop_at = time.monotonic() + 1.0  # warm-up
        await asyncio.gather(*(worker(i) for i in range(cfg["inflight"])))
        done = failed = 0
        print("GO", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        stop_at = start + cfg["seconds"]
        await asyncio.gather(*(worker(i) for i in range(cfg["inflight"])))
        print(json.dumps({"done": done, "failed": failed, "elapsed": time.monotonic() - start}), flush=True)

asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--inflight", type=int, default=64)
    args = parser.parse_args()

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    csrs = []
    for _ in range(256):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        csrs.append(csr.public_bytes(serialization.Encoding.PEM).decode())

    tmp = Path(tempfile.mkdtemp(prefix="ztd-bench-"))
    ports = {"ZTD_XDS_PORT": free_port(), "ZTD_SECURE_PORT": free_port(), "ZTD_MONITORING_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "ZTD_LOG_LEVEL": "warning"}
    ztd = subprocess.Popen(
        pinned(0, [sys.executable, "-m", "xds_server.main", "--state-dir", str(tmp / "state")]), cwd=REPO, env=env
    )
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['ZTD_MONITORING_PORT']}/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "ztctl",
                "token",
                "create",
                "bench/load",
                "--state-dir",
                str(tmp / "state"),
                "--duration",
                "2h",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        load_cfg = {
            "address": f"127.0.0.1:{ports['ZTD_SECURE_PORT']}",
            "root": (tmp / "state" / "root-cert.pem").read_text(),
            "token": token,
            "csrs": csrs,
            "inflight": args.inflight,
            "seconds": args.seconds,
        }

        def measure(mode: str) -> tuple[float, float]:
            load = subprocess.Popen(
                pinned(1, [sys.executable, "-c", LOAD, str(REPO), json.dumps({**load_cfg, "mode": mode})]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert load.stdout is not None and load.stdin is not None
            assert load.stdout.readline().strip() == "GO"
            cpu0 = cpu_seconds(ztd.pid)
            load.stdin.write("\n")
            load.stdin.flush()
            result = json.loads(load.stdout.readline())
            cpu = cpu_seconds(ztd.pid) - cpu0
            load.wait()
            if result["failed"]:
                raise SystemExit(f"{result['failed']} {mode} requests failed")
            return result["done"] / result["elapsed"], (result["done"] / cpu if cpu else float("nan"))

        rates, per_cpu, ceilings, floors = [], [], [], []
        for round_no in range(args.rounds):
            rate, cpu_rate = measure("ca")
            rates.append(rate)
            per_cpu.append(cpu_rate)
            floors.append(measure("health")[0])
            sign, verify, ceiling = openssl_ceiling(2)
            ceilings.append(ceiling)
            print(
                f"round {round_no + 1}: {rate:6.0f} certs/s ({cpu_rate:6.0f}/server CPU-s) | empty RPC "
                f"{floors[-1]:6.0f}/s | openssl ecdsap256 sign {sign:.0f}/s verify {verify:.0f}/s -> "
                f"ceiling {ceiling:.0f}/s | ratio {rate / ceiling:.1%}"
            )
        ratios = [r / c for r, c in zip(rates, ceilings, strict=True)]
        print()
        print(
            f"certs/s through CreateCertificate (1 server core): median {statistics.median(rates):.0f} "
            f"[{min(rates):.0f}..{max(rates):.0f}]"
        )
        print(
            f"certs per server CPU-second:                         median {statistics.median(per_cpu):.0f} "
            f"[{min(per_cpu):.0f}..{max(per_cpu):.0f}]"
        )
        print(
            f"openssl ecdsap256 sign+verify ceiling (1 core):       median {statistics.median(ceilings):.0f} "
            f"[{min(ceilings):.0f}..{max(ceilings):.0f}]"
        )
        print(
            f"ratio to ceiling:                                     median {statistics.median(ratios):.1%} "
            f"[{min(ratios):.1%}..{max(ratios):.1%}]  (target >= 40%)"
        )
        print(
            f"empty gRPC call (Health/Check, same port and client): median {statistics.median(floors):.0f}/s "
            f"[{min(floors):.0f}..{max(floors):.0f}] -> the Python gRPC floor; certs/s is "
            f"{statistics.median(rates) / statistics.median(floors):.0%} of it"
        )
    finally:
        ztd.send_signal(signal.SIGTERM)
        ztd.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
