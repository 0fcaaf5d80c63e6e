"""The test kernel's clock: when the host keeps time with the TSC, guest processes read CLOCK_MONOTONIC and
CLOCK_REALTIME through the vDSO without a syscall, as on a real node (tools/uml-kernel/patches/0003), and the
clock they read is the kernel's own: never backwards, in step with clock_gettime(2) made as a syscall, across
processes. On a host that keeps time otherwise, the kernel stays on the host's clock_gettime and so do the reads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.uml import run_in_uml

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# the host's here, the guest's inside it
CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")

# Inside the guest: per-read cost of the vDSO clock and of a syscall, and an ordering check in three processes.
# Every 64th read is bracketed: vDSO read, clock_gettime as a raw syscall, vDSO read; the syscall's answer must
# fall between the two (both are the timekeeper's arithmetic on the same counter).
GUEST = r"""
import ctypes, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class Ts(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
SYS_clock_gettime = 228

def sys_ns(clock):
    ts = Ts()
    assert libc.syscall(SYS_clock_gettime, clock, ctypes.byref(ts)) == 0
    return ts.s * 10**9 + ts.ns

def check(n):
    out = {}
    for name, clock, read in (("monotonic", time.CLOCK_MONOTONIC, time.monotonic_ns),
                              ("realtime", time.CLOCK_REALTIME, time.time_ns)):
        back = outside = 0
        prev = read()
        for i in range(n):
            now = read()
            back += now < prev
            prev = now
            if i % 64 == 0:
                a, s, b = read(), sys_ns(clock), read()
                outside += not (a <= s <= b)
                prev = b
        out[name] = {"reads": n, "backwards": back, "syscall_outside": outside}
    return out

def per_call_us(fn, n):
    def once():
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - t0) / n / 1000
    return min(once() for _ in range(5))  # the fastest of five rounds: the host's load only ever adds

source = open(sys.argv[1]).read().strip()  # the guest's own sysfs
pipes = []
for _ in range(2):
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        os.write(w, json.dumps(check(100000)).encode())
        os._exit(0)
    os.close(w)
    pipes.append(r)
facts = {
    "clocksource": source,
    "monotonic_us": per_call_us(time.monotonic, 4000),
    "getpid_us": per_call_us(os.getpid, 400),
    "sleep_100ms": (lambda t0: (time.sleep(0.1), time.monotonic() - t0)[1])(time.monotonic()),
    "realtime": time.time(),
    "procs": [check(100000)],
}
for r in pipes:
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    facts["procs"].append(json.loads(data))
    os.wait()
print("RESULT " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def clock() -> dict[str, Any]:
    before = time.time()
    done = run_in_uml([sys.executable, "-S", "-c", GUEST, str(CLOCKSOURCE)], 120)
    after = time.time()
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    facts: dict[str, Any] = json.loads(line[len("RESULT ") :])
    facts["host_window"] = (before, after)
    return facts


def test_the_guest_clock_never_goes_backwards_and_agrees_with_the_syscall(clock: dict[str, Any]) -> None:
    assert len(clock["procs"]) == 3  # the guest's first process and two children, at the same time
    for proc in clock["procs"]:
        for name in ("monotonic", "realtime"):
            assert proc[name] == {"reads": 100000, "backwards": 0, "syscall_outside": 0}, (name, proc)
    assert 0.099 <= clock["sleep_100ms"] < 0.5
    before, after = clock["host_window"]
    assert before - 1 <= clock["realtime"] <= after + 1  # the guest's wall clock is the host's


def test_clock_reads_take_no_syscall_when_the_host_keeps_time_with_the_tsc(clock: dict[str, Any]) -> None:
    host = CLOCKSOURCE.read_text().strip() if CLOCKSOURCE.exists() else ""
    if host == "tsc":
        assert clock["clocksource"] == "tsc"
        # a syscall here is ~30 us (trapped through the host by ptrace); a vDSO read is a few hundred ns of Python
        assert clock["monotonic_us"] * 10 < clock["getpid_us"], clock
    else:  # the TSC is not the host's clock: the kernel keeps the host's clock_gettime, and so do the reads
        assert clock["clocksource"] == "timer"
        assert clock["monotonic_us"] * 3 > clock["getpid_us"], clock
