"""Watched files, one way for the whole project: `signature()` says whether a file changed, `FileWatcher` polls
sets of files (zt-agent: the root bundle it trusts and the `file-cert:`/`file-root:` SDS names).

Polling, in a worker thread: stat every watched path each interval and read a set again when any stat
signature (device, inode, size, mtime) changed. Stat follows symlinks, so Kubernetes' `..data` symlink swaps and
atomic renames are seen like in-place writes, even when size and mtime happen to match. Other readers of single
files (the bridge's VF map, the OIDC JWKS file) compare the same `signature()`. A folder of config (ztd) is
watched with inotify instead: ztcore/mesh/registry/files.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Contents = dict[Path, bytes | None]  # None: missing or unreadable
Signature = tuple[tuple[int, int, int, int] | None, ...]

_UNSEEN: Signature = ()


@dataclass(slots=True)
class _Entry:
    paths: tuple[Path, ...]
    callback: Callable[[Contents], None]
    signature: Signature = _UNSEEN


def signature(paths: Sequence[Path]) -> Signature:
    """(device, inode, size, mtime) per path, None for one that cannot be stat'ed: equal means unchanged."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _scan(entries: list[tuple[int, tuple[Path, ...], Signature]]) -> list[tuple[int, Signature, Contents]]:
    changed = []
    for handle, paths, previous in entries:
        now = signature(paths)
        if now != previous:
            changed.append((handle, now, {p: _read(p) for p in paths}))
    return changed


class FileWatcher:
    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._entries: dict[int, _Entry] = {}
        self._next = 0
        self._poke = asyncio.Event()

    def watch(self, paths: Sequence[Path], callback: Callable[[Contents], None]) -> int:
        """Call `callback` with the contents of all `paths` now (at the next scan) and after each change."""
        self._next += 1
        self._entries[self._next] = _Entry(tuple(paths), callback)
        self._poke.set()
        return self._next

    def unwatch(self, handle: int) -> None:
        self._entries.pop(handle, None)

    async def scan_once(self) -> None:
        snapshot = [(h, e.paths, e.signature) for h, e in self._entries.items()]
        if not snapshot:
            return
        for handle, stamp, contents in await asyncio.to_thread(_scan, snapshot):
            entry = self._entries.get(handle)
            if entry is None:
                continue  # unwatched while we were reading
            entry.signature = stamp
            try:
                entry.callback(contents)
            except Exception:  # one bad consumer must not stop the watcher
                log.exception("file watch callback for %s failed", ", ".join(map(str, entry.paths)))

    async def run(self) -> None:
        while True:
            self._poke.clear()
            await self.scan_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=self.interval)
