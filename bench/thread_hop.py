"""What a worker-thread hop costs, on this host and in the project's UML kernel, beside a plain syscall.

    .venv/bin/python bench/thread_hop.py [--count 500] [--rounds 5] [--skip-uml]

Why it matters: the bridge ran every TLS step and every netlink request through `asyncio.to_thread`, about a
dozen in a row per new tunnel. Each figure is the median over `rounds` of `count` awaited `asyncio.to_thread` of
a no-op, next to `os.getpid()` (one syscall) measured in the same process: UML pays for every syscall and
context switch, the host barely does. Beside them, a clock read (`time.monotonic()`, `time.time()`) and an empty
`epoll_wait`, which an event loop makes on every turn: a vDSO answers a clock read without a syscall, on the host
and, when the host keeps time with the TSC, in the project's UML kernel too (tools/uml-kernel/patches/0003);
before that patch every clock read in UML was a syscall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))


# one syscall each, except the clock reads a vDSO answers (the host's; UML's when the host keeps time with the TSC)
CALLS: dict[str, Callable[[], object]] = {"getpid": os.getpid, "monotonic": time.monotonic, "time": time.time}


async def measure(count: int, rounds: int) -> dict[str, Any]:
    hops: list[float] = []
    calls: dict[str, list[float]] = {name: [] for name in (*CALLS, "epoll0")}
    poller = select.epoll()
    try:
        each = {**CALLS, "epoll0": lambda: poller.poll(0)}
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(count):
                await asyncio.to_thread(lambda: None)
            hops.append((time.perf_counter() - t0) / count * 1e6)
            for name, call in each.items():
                t0 = time.perf_counter()
                for _ in range(count):
                    call()
                calls[name].append((time.perf_counter() - t0) / count * 1e6)
    finally:
        poller.close()
    return {
        "hop_us": round(statistics.median(hops), 1),
        "hop_spread_us": [round(min(hops), 1), round(max(hops), 1)],
        **{f"{name}_us": round(statistics.median(v), 2) for name, v in calls.items()},
    }


def line(where: str, r: dict[str, Any]) -> str:
    return (
        f"{where}: to_thread hop median {r['hop_us']} us (min-max {r['hop_spread_us'][0]}-{r['hop_spread_us'][1]}),"
        f" getpid {r['getpid_us']} us -> a hop is {r['hop_us'] / max(r['getpid_us'], 1e-9):,.0f} syscalls;"
        f" time.monotonic() {r['monotonic_us']} us, time.time() {r['time_us']} us, epoll_wait(0) {r['epoll0_us']} us"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-uml", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count < 1 or args.rounds < 1:
        print("thread_hop: --count and --rounds must be at least 1", file=sys.stderr)
        return 2
    host = asyncio.run(measure(args.count, args.rounds))
    if args.inside:
        print("RESULT " + json.dumps(host))
        return 0
    print(line("host", host))
    if not args.skip_uml:
        from bench.inside_uml import run_inside

        uml = run_inside("thread_hop", __file__, ["--count", str(args.count), "--rounds", str(args.rounds)],
                         timeout=300, mem="512M")  # fmt: skip
        if uml is None:
            return 1
        print(line("UML", uml))
    return 0


if __name__ == "__main__":
    sys.exit(main())
