"""The bridge's allocator settings: freed large buffers go back to the system instead of staying resident."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from ipsec_bridge.allocator import Allocator

# In a child process (the settings are process-wide): a 16 MiB buffer freed first makes glibc raise its mmap
# threshold (its default, adaptive behaviour), then 50 MiB of 256 KiB buffers are written and freed while newer
# small allocations stay in use above them. The child prints how much of those 50 MiB stayed resident.
BURST = """
import ctypes, sys
from ipsec_bridge.allocator import Allocator
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024
if sys.argv[1] == "tuned":
    assert Allocator().tune()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(16 << 20)
ctypes.memset(big, 1, 16 << 20)
libc.free(big)
base = rss()
blocks = [libc.malloc(256 << 10) for _ in range(200)]
for b in blocks:
    ctypes.memset(b, 1, 256 << 10)
pin = [libc.malloc(1000) for _ in range(100)]
mid = rss()
for b in blocks:
    libc.free(b)
assert mid - base > 40, mid - base  # the burst was resident
if sys.argv[1] == "trimmed":
    assert Allocator().trim()
print(round(rss() - base, 1))
"""


def _kept_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", BURST, mode], capture_output=True, text=True, check=True, timeout=60)
    return float(out.stdout.strip())


@pytest.mark.skipif(not Allocator().available, reason="glibc's malloc only: other C libraries have no mallopt")
def test_freed_large_buffers_leave_the_resident_set_once_tuned() -> None:
    assert _kept_mib("default") > 40  # glibc's adaptive threshold: the burst stays resident
    assert _kept_mib("tuned") < 5


@pytest.mark.skipif(not Allocator().available, reason="glibc's malloc only: other C libraries have no malloc_trim")
def test_a_trim_returns_the_free_pages_inside_the_heap() -> None:
    """What the bridge's periodic trim does for memory freed under thresholds that were raised before it tuned
    them, or freed in small pieces: glibc hands back whole free pages in the middle of its heap."""
    assert _kept_mib("trimmed") < 5


async def test_handshake_connections_read_below_the_mmap_threshold() -> None:
    # asyncio reads a stream 256 KiB at a time: over the fixed threshold, every read would map and unmap a buffer
    from ipsec_bridge.allocator import THRESHOLD
    from ipsec_bridge.handshake import small_reads

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    assert writer.transport.max_size >= THRESHOLD  # type: ignore[attr-defined]  # asyncio's default
    small_reads(writer)
    assert writer.transport.max_size < THRESHOLD  # type: ignore[attr-defined]
    writer.close()
    server.close()
    await server.wait_closed()
