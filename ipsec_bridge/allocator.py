"""Giving the C allocator's freed memory back to the system (glibc; elsewhere nothing happens).

A bridge's load comes in bursts: the first xDS response of a 10,000-pod mesh, a wave of handshakes, a dump of
every SA, a /config_dump of thousands of rows. glibc keeps what a burst freed for reuse, and after each large
free it raises its mmap threshold, so the next large buffer comes from the heap as well; the resident set then
stays near the last burst's high-water mark. Two fixed thresholds (large buffers get mappings of their own,
unmapped when freed; the heap's top is trimmed past 128 KiB) and `malloc_trim(0)` now and then (it also hands
back whole free pages inside the heap) keep it near what is in use: measured in the on-demand bench
(docs/benchmarks.md), 4-5 MiB less at rest and with 2,000 tunnels. Python's own small-object arenas are not
glibc's to trim; CPython frees those itself when one empties.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # glibc's own starting values, kept fixed instead of raised after large frees
TRIM_EVERY = 10.0  # seconds


class Allocator:
    """glibc's malloc, or nothing (musl and other C libraries have neither call)."""

    def __init__(self) -> None:
        self._libc: Any = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._libc = libc
        except (OSError, AttributeError):
            log.debug("no glibc malloc: freed memory is left to the C library")

    @property
    def available(self) -> bool:
        return self._libc is not None

    def tune(self) -> bool:
        """Fix the mmap and trim thresholds (True: both taken)."""
        if self._libc is None:
            return False
        mmap = self._libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)
        return bool(mmap and self._libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))

    def trim(self) -> bool:
        """malloc_trim(0): True when memory went back to the system."""
        return self._libc is not None and bool(self._libc.malloc_trim(0))

    async def run(self, every: float = TRIM_EVERY) -> None:
        """Until cancelled: trim every `every` seconds (in a worker thread: it walks the heap under its locks)."""
        if self._libc is None:
            return
        while True:
            await asyncio.sleep(every)
            await asyncio.to_thread(self.trim)
