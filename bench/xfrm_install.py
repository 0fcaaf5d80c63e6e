"""Time to encode + install N ESP SAs with our netlink encoder vs `ip -batch` with the same SAs, in a real kernel.

    .venv/bin/python bench/xfrm_install.py [--count 10000] [--repeat 3] [--window 64] [--json]

Boots user-mode-linux (Linux 6.1, see tests/kernel/uml.py; built on first use) and runs itself inside with
`--inside`. Each round, in a fresh netns: (1) ours, batched: SA models -> encode -> NEWSA, `window` messages per
datagram, one ack each; (2) ours, one request per datagram, waiting for each ack (what `ip -batch` does);
(3) `ip -batch` reading a prepared file of `xfrm state add` lines on tmpfs. After every install the SAs are
dumped and compared with the intended ones (all fields, keys included, in memory only), then flushed.
UML numbers are functional only: every syscall is a trip through the UML kernel, so absolute rates are far
below bare metal; the ratios are what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.inside_uml import run_inside  # noqa: E402
from ipsec_bridge.xfrm import messages as m  # noqa: E402 (after the sys.path line)
from ipsec_bridge.xfrm.netlink import XfrmSocket  # noqa: E402

NETNS = "bench"


def make_sas(count: int, seed: int) -> list[m.SecurityAssociation]:
    """Pod-pair tunnel SAs like the bridge installs: AES-GCM-128, ESN, replay 128, lifetimes, reqid, marks."""
    rng = random.Random(seed)  # reproducible keys; this is a benchmark, not a key source
    sas = []
    for i in range(count):
        hi, lo = divmod(i, 250)
        sas.append(
            m.SecurityAssociation(
                src=IPv4Address(f"172.16.{hi % 250}.{lo + 1}"),
                dst=IPv4Address(f"172.17.{hi % 250}.{lo + 1}"),
                spi=0x10000 + i,
                aead=m.Aead(rng.randbytes(16), rng.randbytes(4)),
                selector=m.Selector.of(f"10.{100 + hi % 100}.{lo}.1/32", f"10.{200 + hi % 50}.{lo}.2/32"),
                reqid=1 + i,
                replay_window=128,
                esn=True,
                lifetime=m.Lifetime(soft_add_seconds=3000, hard_add_seconds=3600),
                mark=m.Mark(0, 0xF00),
                output_mark=m.Mark(0xE00, 0xF00),
            )
        )
    return sas


def ip_batch_line(sa: m.SecurityAssociation) -> str:
    assert sa.aead is not None and sa.mark is not None and sa.output_mark is not None
    lt = sa.lifetime
    return (
        f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi 0x{sa.spi:08x} reqid {sa.reqid} mode tunnel"
        f" replay-window {sa.replay_window} flag esn"
        f" mark {sa.mark.value:#x} mask {sa.mark.mask:#x} output-mark {sa.output_mark.value:#x}"
        f" mask {sa.output_mark.mask:#x}"
        f' aead "{sa.aead.name}" 0x{(sa.aead.key + sa.aead.salt).hex()} {sa.aead.icv_bits}'
        f" sel src {sa.selector.src} dst {sa.selector.dst}"
        f" limit time-soft {lt.soft_add_seconds} limit time-hard {lt.hard_add_seconds}\n"
    )


async def timed(action: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


def prepare(count: int, batch_file: Path) -> list[m.SecurityAssociation]:
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    sas = make_sas(count, seed=5)
    fd = os.open(batch_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds keys
    with os.fdopen(fd, "w") as out:
        out.write("".join(ip_batch_line(sa) for sa in sas))
    return sas


async def inside(count: int, repeat: int, window: int) -> dict[str, Any]:
    batch_file = Path("/run/xfrm.batch")
    sas = await asyncio.to_thread(prepare, count, batch_file)
    wanted = {sa.spi: sa for sa in sas}
    sock = await XfrmSocket.open(NETNS)

    start = time.perf_counter()
    encoded = [m.new_sa(sa).encode(i + 1) for i, sa in enumerate(sas)]
    encode_seconds = time.perf_counter() - start
    encoded_bytes = sum(len(e) for e in encoded)

    async def ours_batched() -> None:
        await sock.add_sas(sas, window=window)

    async def ours_one_by_one() -> None:
        await sock.add_sas(sas, window=1)

    async def ip_batch() -> None:
        done = await asyncio.to_thread(
            subprocess.run, ["ip", "-n", NETNS, "-batch", str(batch_file)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"ip -batch failed: {done.stderr.strip()[:500]}")

    runs: dict[str, list[float]] = {"ours_batched": [], "ours_one_by_one": [], "ip_batch": []}
    dump_seconds: list[float] = []
    actions = {"ours_batched": ours_batched, "ours_one_by_one": ours_one_by_one, "ip_batch": ip_batch}
    # one untimed round first: crypto template instantiation and slab growth would bill whoever runs first
    for round_no in range(-1, repeat):
        order = list(actions) if round_no % 2 == 0 else list(reversed(actions))
        for name in order:
            seconds = await timed(actions[name])
            if round_no >= 0:
                runs[name].append(seconds)
            start = time.perf_counter()
            installed = {info.sa.spi: info.sa for info in await sock.list_sas()}
            dump_seconds.append(time.perf_counter() - start)
            if installed != wanted:  # same SAs, every field and key, whichever tool installed them
                diff = sum(1 for spi, sa in wanted.items() if installed.get(spi) != sa)
                raise RuntimeError(f"{name}: {diff} of {count} SAs differ from the intended ones")
            await sock.flush_sas()
    sock.close()
    await asyncio.to_thread(batch_file.unlink)
    summary: dict[str, dict[str, Any]] = {}
    for name, times in runs.items():
        median = statistics.median(times)
        summary[name] = {"median_s": median, "min_s": min(times), "runs_s": times, "sas_per_s": count / median}
    return {
        "count": count,
        "repeat": repeat,
        "window": window,
        "kernel": os.uname().release,
        "encode_only_s": encode_seconds,
        "dump_decode_median_s": statistics.median(dump_seconds),
        "encoded_bytes": encoded_bytes,
        "results": summary,
        "ratio_batched_vs_ip": summary["ours_batched"]["sas_per_s"] / summary["ip_batch"]["sas_per_s"],
        "ratio_one_by_one_vs_ip": summary["ours_one_by_one"]["sas_per_s"] / summary["ip_batch"]["sas_per_s"],
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"XFRM install of {result['count']} SAs (AES-GCM-128, ESN, tunnel) in UML Linux {result['kernel']},"
        f" median of {result['repeat']}:",
        f"  encode only (pure Python):       {result['encode_only_s']:.3f} s"
        f" ({result['count'] / result['encode_only_s']:,.0f} SAs/s, {result['encoded_bytes']:,} bytes)",
    ]
    lines.append(
        f"  GETSA dump + decode of all:      {result['dump_decode_median_s']:.3f} s"
        f" ({result['count'] / result['dump_decode_median_s']:,.0f} SAs/s)"
    )
    labels = {
        "ours_batched": f"ours, {result['window']} per datagram",
        "ours_one_by_one": "ours, one per datagram",
        "ip_batch": "ip -batch",
    }
    for key, label in labels.items():
        r = result["results"][key]
        lines.append(f"  {label:<32} {r['median_s']:.3f} s  ({r['sas_per_s']:,.0f} SAs/s; min {r['min_s']:.3f} s)")
    lines.append(f"  ours batched vs ip -batch:      {result['ratio_batched_vs_ip']:.2f}x the rate")
    lines.append(f"  ours one-by-one vs ip -batch:   {result['ratio_one_by_one_vs_ip']:.2f}x the rate")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count < 1 or args.repeat < 1 or args.window < 1 or args.count > 250 * 250:
        print("xfrm_install: --count must be 1..62500, --repeat and --window >= 1", file=sys.stderr)
        return 2
    if args.inside:
        print("RESULT " + json.dumps(asyncio.run(inside(args.count, args.repeat, args.window))))
        return 0
    inner = ["--count", str(args.count), "--repeat", str(args.repeat), "--window", str(args.window)]
    result = run_inside("xfrm_install", __file__, inner, timeout=1200, mem="2G")
    if result is None:
        return 1
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
