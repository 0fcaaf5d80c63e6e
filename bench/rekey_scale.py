"""Rekey of many tunnels' SAs (make-before-break, the bridge's XFRM path) beside `ip -batch` doing the same.

    .venv/bin/python bench/rekey_scale.py [--tunnels 5000] [--repeat 3] [--concurrency 32] [--json]

Boots user-mode-linux (Linux 6.1, tests/kernel/uml.py) and runs itself inside with `--inside`, in one netns
(one node). Before every timed rekey the node holds `tunnels` pod-pair tunnels of generation 1 (2 SAs + in/fwd/out
policies each, plus the block policies) installed untimed; `tunnels` = 5,000 replaces 10,000 SAs. Then, timed:

- ours: per tunnel exactly what a rekey runs through ipsec_bridge.sa_manager on the initiator's node, with
  `concurrency` tunnels in flight (zt-bridge's max_parallel_handshakes): GenerationInstaller(previous reqid) ->
  ALLOCSPI -> inbound SA (UPDSA over the larval state) -> outbound SA (NEWSA) + in/fwd/out policies switched to
  the new reqid (UPDPOLICY) in one batch; the coalescer merges what concurrent tunnels submit (the bridge now
  moves only the out policy on a rekey, so this is one UPDPOLICY per tunnel more than it sends). Then the break:
  every due tunnel's two old SAs in one `delete_sa_groups` submission, as the bridge scheduler's retire_due does when
  their grace period ends.
- ip -batch: `ip -n NS -batch FILE` with the same operations per tunnel (FILE split into 40,000-line parts run
  one after another, see IP_BATCH_LINES): `xfrm state allocspi ... min S max S`,
  `xfrm state update` (inbound), `xfrm state add` (outbound), three `xfrm policy update`, then two
  `xfrm state delete` per tunnel; FILE is written to tmpfs before the clock starts.
- before (reported apart, not the figure): ours with the old scheduler's break, one awaited `delete_sas` per
  tunnel after another.

The TLS handshake that yields the new keys is not part of this figure (bench/tunnels.py and
bench/tunnel_scale.py measure it); keys here come from a seeded PRNG. After each method the node's SAs are
dumped and compared field by field (keys included, in memory only) with what should be there; the out policies
must point at the new reqids. Target (issue 5): ours at >= 50 % of ip -batch's rate. UML numbers are
functional only (one CPU, slow syscalls); the ratio is the figure.
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
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.inside_uml import run_inside  # noqa: E402
from ipsec_bridge.sa_manager import (  # noqa: E402 (after the sys.path line)
    BRIDGE_MARK,
    Endpoints,
    GenerationInstaller,
    SaManager,
    SaSettings,
)
from ipsec_bridge.xfrm import messages as m  # noqa: E402
from ipsec_bridge.xfrm.consts import PolicyDir  # noqa: E402
from ipsec_bridge.xfrm.netlink import XfrmSocket  # noqa: E402

NETNS = "rekey"
LOCAL, PEER = IPv4Address("192.168.60.1"), IPv4Address("192.168.60.2")
GEN1_IN, GEN1_OUT, IP_IN, GEN2_OUT = 0x0100_0000, 0x0200_0000, 0x0300_0000, 0x0400_0000  # SPI bases
TARGET = 0.5
# ip's RSS grows with the batch (~3 KB a line: 264 MB at 80,000 lines) and UML SIGKILLs it somewhere above
# 40,000 lines with GBs free and no OOM report; longer batches run as several `ip -batch` processes in a row.
IP_BATCH_LINES = 40_000


@dataclass(frozen=True, slots=True)
class Tunnel:
    ep: Endpoints
    old_reqid: int
    old_in: int
    old_out: int
    key_in: m.Aead
    key_out: m.Aead

    @property
    def selector(self) -> tuple[IPv4Network, IPv4Network]:
        assert isinstance(self.ep.local_net, IPv4Network) and isinstance(self.ep.peer_net, IPv4Network)
        return (self.ep.local_net, self.ep.peer_net)


def tunnels(count: int, sa: SaManager, seed: int) -> list[Tunnel]:
    rng = random.Random(seed)  # benchmark keys, not a key source
    out = []
    for i in range(count):
        hi, lo = divmod(i, 250)
        ep = Endpoints(LOCAL, PEER, ip_network(f"10.1.{hi}.{lo + 1}/32"), ip_network(f"10.2.{hi}.{lo + 1}/32"))
        key_in = m.Aead(rng.randbytes(16), rng.randbytes(4))
        key_out = m.Aead(rng.randbytes(16), rng.randbytes(4))
        out.append(Tunnel(ep, sa.next_reqid(), GEN1_IN + i, GEN1_OUT + i, key_in, key_out))
    return out


def limit_args(lt: m.Lifetime) -> str:
    return (
        f"limit byte-soft {lt.soft_bytes} limit byte-hard {lt.hard_bytes}"
        f" limit packet-soft {lt.soft_packets} limit packet-hard {lt.hard_packets}"
    )


def sa_line(verb: str, sa: m.SecurityAssociation) -> str:
    """`xfrm state add|update` for one SA as SaManager builds it (AES-GCM, ESN, replay 128, mark, limits)."""
    assert sa.aead is not None and sa.mark is not None
    return (
        f"xfrm state {verb} src {sa.src} dst {sa.dst} proto esp spi 0x{sa.spi:08x} reqid {sa.reqid} mode tunnel"
        f" replay-window {sa.replay_window} flag esn mark {sa.mark.value:#x} mask {sa.mark.mask:#x}"
        f' aead "{sa.aead.name}" 0x{(sa.aead.key + sa.aead.salt).hex()} {sa.aead.icv_bits}'
        f" sel src {sa.selector.src} dst {sa.selector.dst} {limit_args(sa.lifetime)}"
    )


def policy_line(p: m.Policy) -> str:
    assert p.mark is not None
    parts = [
        f"xfrm policy update src {p.selector.src} dst {p.selector.dst} dir {p.direction.name.lower()}",
        f"priority {p.priority} mark {p.mark.value:#x} mask {p.mark.mask:#x}",
    ]
    parts += [f"tmpl src {t.src} dst {t.dst} proto esp reqid {t.reqid} mode tunnel" for t in p.templates]
    return " ".join(parts)


def ip_batch(sa: SaManager, tuns: list[Tunnel], new_reqids: list[int], new_out_spis: list[int]) -> str:
    """The same rekey as ours, as ip commands: make (every tunnel), then break (every tunnel)."""
    mark = BRIDGE_MARK
    make, brk = [], []
    for i, (t, reqid, out_spi) in enumerate(zip(tuns, new_reqids, new_out_spis, strict=True)):
        spi_in = IP_IN + i
        make.append(
            f"xfrm state allocspi src {PEER} dst {LOCAL} proto esp mode tunnel mark {mark.value:#x} mask"
            f" {mark.mask:#x} reqid {reqid} min 0x{spi_in:08x} max 0x{spi_in:08x}"
        )
        make.append(sa_line("update", sa.inbound_sa(t.ep, spi_in, t.key_in, reqid)))
        make.append(sa_line("add", sa.outbound_sa(t.ep, out_spi, t.key_out, reqid)))
        make += [policy_line(p) for p in sa.in_policies(t.ep, t.selector)]
        make.append(policy_line(sa.out_policy(t.ep, t.selector, reqid)))
        for sid in (sa.outbound_id(t.ep, t.old_out), sa.inbound_id(t.ep, t.old_in)):
            brk.append(
                f"xfrm state delete src {sid.src} dst {sid.dst} proto esp spi 0x{sid.spi:08x}"
                f" mark {mark.value:#x} mask {mark.mask:#x}"
            )
    return "\n".join(make + brk) + "\n"


def chunks(text: str, lines: int = IP_BATCH_LINES) -> list[str]:
    """The batch cut into files of at most `lines` lines, in order."""
    rows = text.splitlines(keepends=True)
    return ["".join(rows[i : i + lines]) for i in range(0, len(rows), lines)]


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds keys
    with os.fdopen(fd, "w") as f:
        f.write(text)


async def install_gen1(sock: XfrmSocket, sa: SaManager, tuns: list[Tunnel]) -> None:
    await sock.flush_sas()
    await sock.flush_policies()
    sas, policies = [], list(sa.block_policies())
    for t in tuns:
        sas.append(sa.inbound_sa(t.ep, t.old_in, t.key_in, t.old_reqid))
        sas.append(sa.outbound_sa(t.ep, t.old_out, t.key_out, t.old_reqid))
        policies += sa.in_policies(t.ep, t.selector)
        policies.append(sa.out_policy(t.ep, t.selector, t.old_reqid))
    await sock.add_sas(sas)
    await sock.add_policies(policies, update=True)


async def ours(
    sa: SaManager, tuns: list[Tunnel], concurrency: int, *, per_tunnel_break: bool = False
) -> tuple[float, float, list[tuple[int, int]]]:
    """(make seconds, break seconds, per tunnel (new reqid, new inbound SPI)).

    per_tunnel_break: one awaited delete_sas per tunnel (the scheduler before batched retirement) instead of
    one delete_sa_groups submission for every due tunnel (ipsec_bridge.tunnels.scheduler.Scheduler.retire_due)."""
    gate = asyncio.Semaphore(concurrency)
    done: list[tuple[int, int]] = [(0, 0)] * len(tuns)

    async def one(i: int, t: Tunnel) -> None:
        async with gate:
            inst = GenerationInstaller(sa, t.ep, (t.selector,), sa.next_reqid(), t.old_reqid)
            spi = await inst.allocate_spi()
            await inst.install((spi, t.key_in), None)
            await inst.install(None, (GEN2_OUT + i, t.key_out))  # the peer allocated it (its ALLOCSPI)
            done[i] = (inst.reqid, spi)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, t) for i, t in enumerate(tuns)))
    made = time.perf_counter()
    if per_tunnel_break:
        for t in tuns:
            await sa.delete_sas([sa.outbound_id(t.ep, t.old_out), sa.inbound_id(t.ep, t.old_in)])
    else:
        errors = await sa.delete_sa_groups(
            [[sa.outbound_id(t.ep, t.old_out), sa.inbound_id(t.ep, t.old_in)] for t in tuns]
        )
        failed = [e for e in errors if e is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} tunnels' old SAs were not deleted: {failed[0]}")
    return made - start, time.perf_counter() - made, done


async def verify(sock: XfrmSocket, sa: SaManager, tuns: list[Tunnel], new: list[tuple[int, int]]) -> None:
    want: dict[tuple[IPv4Address, int], m.SecurityAssociation] = {}
    for i, (t, (reqid, spi_in)) in enumerate(zip(tuns, new, strict=True)):
        for s in (sa.inbound_sa(t.ep, spi_in, t.key_in, reqid), sa.outbound_sa(t.ep, GEN2_OUT + i, t.key_out, reqid)):
            assert isinstance(s.dst, IPv4Address)
            want[(s.dst, s.spi)] = s
    got = {(i.sa.dst, i.sa.spi): i.sa for i in await sock.list_sas()}
    wrong = sum(1 for k, s in want.items() if got.get(k) != s)
    if wrong or len(got) != len(want):
        raise RuntimeError(f"{wrong} of {len(want)} new SAs differ or are missing; {len(got)} SAs in the kernel")
    out_reqids = {
        p.policy.selector.src: p.policy.templates[0].reqid
        for p in await sock.list_policies()
        if p.policy.direction == PolicyDir.OUT and p.policy.templates
    }
    stale = sum(1 for t, (reqid, _) in zip(tuns, new, strict=True) if out_reqids.get(t.ep.local_net) != reqid)
    if stale:
        raise RuntimeError(f"{stale} out policies do not point at their new generation")


async def inside(count: int, repeat: int, concurrency: int) -> dict[str, Any]:
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", NETNS], check=True)
    sock = await XfrmSocket.open(NETNS)
    sa = SaManager(sock, SaSettings(mesh_cidrs=(ip_network("10.0.0.0/8"),)))
    await sa.start()  # once: reqids keep counting up across rounds, so no generation reuses an old one
    batch_file = Path("/run/rekey.batch")
    runs: dict[str, list[float]] = {
        "ours": [], "ours_make": [], "ours_break": [], "ip_batch": [], "gathered": [], "gathered_break": []
    }  # fmt: skip
    for round_no in range(-1, repeat):  # round -1: untimed warm-up with a few tunnels
        n = count if round_no >= 0 else min(count, 200)
        tuns = tunnels(n, sa, seed=round_no + 7)
        order = ["ours", "ip_batch", "gathered"] if round_no % 2 == 0 else ["gathered", "ip_batch", "ours"]
        for name in order:
            await install_gen1(sock, sa, tuns)
            make_s = break_s = 0.0
            if name in ("ours", "gathered"):
                make_s, break_s, new = await ours(sa, tuns, concurrency, per_tunnel_break=name == "gathered")
                seconds = make_s + break_s
            else:
                reqids = [sa.next_reqid() for _ in tuns]
                files = []
                for k, chunk in enumerate(chunks(ip_batch(sa, tuns, reqids, [GEN2_OUT + i for i in range(n)]))):
                    files.append(batch_file.with_suffix(f".{k}"))
                    await asyncio.to_thread(write_private, files[-1], chunk)
                start = time.perf_counter()
                for f in files:  # in order: every tunnel's make before any break
                    proc = await asyncio.to_thread(
                        subprocess.run, ["ip", "-n", NETNS, "-batch", str(f)], capture_output=True, text=True
                    )
                    if proc.returncode != 0:
                        err = proc.stderr.strip()[:400]
                        raise RuntimeError(f"ip -batch failed (exit {proc.returncode}): {err}")
                seconds = time.perf_counter() - start
                for f in files:
                    await asyncio.to_thread(f.unlink)
                new = [(r, IP_IN + i) for i, r in enumerate(reqids)]
            await verify(sock, sa, tuns, new)
            if round_no >= 0:
                runs[name].append(seconds)
                if name == "ours":
                    runs["ours_make"].append(make_s)
                    runs["ours_break"].append(break_s)
                elif name == "gathered":
                    runs["gathered_break"].append(break_s)
    await sock.flush_sas()
    await sock.flush_policies()
    sa.close()
    sock.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "tunnels": count,
        "sas_replaced": 2 * count,
        "netlink_ops_per_tunnel": 8,
        "repeat": repeat,
        "concurrency": concurrency,
        "kernel": os.uname().release,
        "runs_s": runs,
        "median_s": med,
        "ratio": med["ip_batch"] / med["ours"],  # rates: ours / ip
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def report(r: dict[str, Any]) -> str:
    runs, med, n = r["runs_s"], r["median_s"], r["tunnels"]
    verdict = "met" if r["ratio"] >= TARGET else "NOT met"
    return "\n".join(
        [
            f"rekey of {n:,} tunnels = {r['sas_replaced']:,} SAs replaced ({r['netlink_ops_per_tunnel']} XFRM"
            f" operations per tunnel), median of {r['repeat']}, UML Linux {r['kernel']} (functional timings):",
            f"  ours (sa_manager, {r['concurrency']} in flight): {spread(runs['ours'])}"
            f"  {r['sas_replaced'] / med['ours']:,.0f} SAs/s",
            f"    make (ALLOCSPI + UPDSA + NEWSA + 3 UPDPOLICY): {spread(runs['ours_make'])}",
            f"    break (old SAs, one batch for every tunnel):   {spread(runs['ours_break'])}",
            f"  ip -batch, same operations:       {spread(runs['ip_batch'])}"
            f"  {r['sas_replaced'] / med['ip_batch']:,.0f} SAs/s",
            f"  ours vs ip -batch: {r['ratio']:.2f}x the rate (target >= {TARGET:.2f}: {verdict})",
            f"  before batched retirement (one delete_sas per tunnel): {spread(runs['gathered'])},"
            f" of which break {spread(runs['gathered_break'])}; {med['ip_batch'] / med['gathered']:.2f}x ip -batch",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tunnels", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=1500, help="seconds before the UML run is stopped")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.tunnels <= 62500 or args.repeat < 1 or args.concurrency < 1:
        print("rekey_scale: --tunnels must be 1..62500, --repeat and --concurrency >= 1", file=sys.stderr)
        return 2
    if args.inside:
        print("RESULT " + json.dumps(asyncio.run(inside(args.tunnels, args.repeat, args.concurrency))))
        return 0
    inner = ["--tunnels", str(args.tunnels), "--repeat", str(args.repeat), "--concurrency", str(args.concurrency)]
    result = run_inside("rekey_scale", __file__, inner, timeout=args.timeout, mem="3G")
    if result is None:
        return 1
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
