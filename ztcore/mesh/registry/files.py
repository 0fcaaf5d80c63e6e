"""The folder behind `ztd --config-dir`: load it, and keep the registry in step with it.

The folder is watched (inotify through watchfiles, with a slow rescan behind it for file systems that send no
events); on a change only the files whose (mtime, size, inode) moved are read and parsed again, and the
registry gets just the objects they add, change or drop. A folder with any error never replaces the last good
snapshot, so a half-saved file cannot take policies away from a running mesh; nor can one caught empty between an
in-place write's truncate and its write (`EMPTY_SETTLE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import watchfiles

from ztcore.mesh.registry.objects import FrozenMap, ObjectKey, RegistryObject
from ztcore.mesh.registry.parse import ConfigError, ParseResult, claimed_ips, combine, parse_file, parse_sources
from ztcore.mesh.registry.store import Registry, RegistrySnapshot

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class RegistryLoadError(Exception):
    """The folder could not be loaded; `errors` has one entry per problem (empty if the folder is missing)."""

    def __init__(self, message: str, errors: Sequence[ConfigError] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.errors = tuple(errors)

    def __str__(self) -> str:
        return "\n".join([self.message, *(f"  {e}" for e in self.errors)])


def config_files(root: str | os.PathLike[str]) -> list[str]:
    """Config files under root, recursively, as sorted relative paths ("/"-separated).

    Hidden entries are skipped: editors' temporary files, and the `..data` / `..2024_…` folders a mounted
    ConfigMap contains next to its symlinks (loading those too would duplicate every object).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "registry config directory does not exist", root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(CONFIG_SUFFIXES):
                continue
            found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


def read_dir(root: str | os.PathLike[str]) -> ParseResult:
    """Read and parse every config file under root. Raises FileNotFoundError if root is not a folder."""
    sources: list[tuple[str, str]] = []
    unreadable: list[ConfigError] = []
    for rel in config_files(root):
        path = os.path.join(os.fspath(root), rel)
        try:
            with open(path, encoding="utf-8") as f:
                sources.append((path, f.read()))
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            unreadable.append(ConfigError(path, 0, f"cannot read file: {reason}"))
    result = parse_sources(sources)
    if not unreadable:
        return result
    return ParseResult(result.located, tuple(unreadable) + result.errors, result.skipped)


def load_dir(root: str | os.PathLike[str]) -> tuple[list[RegistryObject], list[ConfigError]]:
    """Objects and errors of every config file under root (see read_dir)."""
    result = read_dir(root)
    return list(result.objects), list(result.errors)


FileStamp = tuple[int, int, int]  # mtime_ns, size, inode


@dataclass(frozen=True, slots=True)
class _File:
    stamp: FileStamp
    parsed: ParseResult


# A file that held objects and now, still the same inode, has no byte is most likely an in-place write caught between
# its truncate and its write (editors, `cat >`, a busy host): its objects stay until the file is written or has stayed
# empty this long. An empty file put in place by a rename (an atomic write, a ConfigMap's symlink swap) is meant.
EMPTY_SETTLE = 1.0


@dataclass(frozen=True, slots=True)
class _Scan:
    files: dict[str, _File]  # every config file now, by relative path
    changed: frozenset[str]  # read again (new or modified), or gone
    read: int  # files read and parsed
    emptied: Mapping[str, float] = FrozenMap()  # file -> since when it has been empty, objects kept (EMPTY_SETTLE)


def _scan(root: str, known: Mapping[str, _File], emptied: Mapping[str, float] = FrozenMap(), now: float = 0.0) -> _Scan:
    """Stat every config file; read and parse only those whose stamp moved. `emptied`/`now`: see EMPTY_SETTLE."""
    files: dict[str, _File] = {}
    changed: set[str] = set()
    still_empty: dict[str, float] = {}
    for rel in config_files(root):
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)  # follows ConfigMap symlinks to the real file
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = (-1, -1, -1)  # vanished or dangling: read below, which reports it
        before = known.get(rel)
        if before is not None and before.stamp == stamp and stamp[0] >= 0:
            files[rel] = before
            continue
        changed.add(rel)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            error = ConfigError(path, 0, f"cannot read file: {reason}")
            files[rel] = _File(stamp, ParseResult((), (error,), FrozenMap()))
            continue
        if not text and before is not None and before.parsed.located and before.stamp[2] == stamp[2]:
            since = emptied.get(rel, now)
            if now - since < EMPTY_SETTLE:
                files[rel] = before  # its old stamp: the next look reads it again
                changed.discard(rel)
                still_empty[rel] = since
                continue
        files[rel] = _File(stamp, parse_file(text, path))
    read = len(changed)
    changed |= set(known) - set(files)
    return _Scan(files, frozenset(changed), read, FrozenMap(still_empty))


class _FolderIndex:
    """How many documents across the folder define each object key and claim each pod IP, kept up to date
    file by file: a change costs the changed files, and the folder is free of conflicts exactly when no key
    or IP is counted twice (then nothing needs the folder-wide pass of `combine`)."""

    def __init__(self) -> None:
        self.keys: Counter[ObjectKey] = Counter()
        self._ips: Counter[str] = Counter()
        self._by_file: dict[str, tuple[list[ObjectKey], list[str]]] = {}
        self._erroneous: set[str] = set()  # files with parse errors of their own
        self._clashes = 0  # keys and IPs counted more than once

    @property
    def clean(self) -> bool:
        return not self._clashes and not self._erroneous

    def replace(self, rel: str, parsed: ParseResult | None) -> None:
        """File `rel` now holds `parsed` (None: it is gone)."""
        keys, ips = self._by_file.pop(rel, ([], []))
        for key in keys:
            self._count(self.keys, key, -1)
        for ip in ips:
            self._count(self._ips, ip, -1)
        self._erroneous.discard(rel)
        if parsed is None:
            return
        keys = [loc.obj.key for loc in parsed.located]
        ips = [ip for loc in parsed.located for ip in claimed_ips(loc.obj)]
        for key in keys:
            self._count(self.keys, key, 1)
        for ip in ips:
            self._count(self._ips, ip, 1)
        self._by_file[rel] = (keys, ips)
        if parsed.errors:
            self._erroneous.add(rel)

    def _count(self, counter: Counter[Any], item: Any, delta: int) -> None:
        before = counter[item]
        after = before + delta
        if after > 0:
            counter[item] = after
        else:
            del counter[item]
        self._clashes += (after > 1) - (before > 1)


class FileRegistrySource:
    """Feeds a Registry from a folder: watched for changes, and read again only where files changed."""

    def __init__(self, path: str | os.PathLike[str], registry: Registry, rescan_interval: float = 10.0) -> None:
        """`rescan_interval`: how often the folder is looked at without any event (file systems that send none)."""
        self._path = os.fspath(path)
        self._registry = registry
        self._rescan_interval = rescan_interval
        self._files: dict[str, _File] = {}
        self._pending: set[str] = set()  # files changed since the registry last took the folder
        self._index = _FolderIndex()
        self._provided: dict[str, list[ObjectKey]] = {}  # file -> the keys the registry took from it
        self._last_errors: tuple[ConfigError, ...] = ()
        self._last_skipped: FrozenMap[str, int] = FrozenMap()
        self._unreachable = False
        self._emptied: Mapping[str, float] = FrozenMap()  # files emptied, objects kept for now (EMPTY_SETTLE)
        self.last_read = 0  # files read and parsed by the latest look

    @property
    def path(self) -> str:
        return self._path

    @property
    def last_errors(self) -> tuple[ConfigError, ...]:
        """Errors of the latest load; empty when the registry reflects the folder."""
        return self._last_errors

    @property
    def last_skipped(self) -> FrozenMap[str, int]:
        """Documents of kinds the registry ignores, by "apiVersion kind", in the latest load."""
        return self._last_skipped

    async def load_initial(self) -> RegistrySnapshot:
        """Load the folder at startup; raise RegistryLoadError with every error rather than start empty."""
        try:
            scan = await asyncio.to_thread(_scan, self._path, {})
        except OSError as e:
            raise RegistryLoadError(f"cannot load registry from {self._path}: {_os_reason(e)}") from e
        errors = self._take(scan)
        if errors:
            raise RegistryLoadError(f"{len(errors)} error(s) in registry config {self._path}", errors)
        return self._install()

    async def poll_once(self) -> bool:
        """Look at the folder; True if the registry changed."""
        try:
            scan = await asyncio.to_thread(_scan, self._path, self._files, self._emptied, time.monotonic())
        except OSError as e:
            error = ConfigError(self._path, 0, f"cannot read registry config: {_os_reason(e)}")
            if not self._unreachable:  # once per outage, not every look
                logger.warning("%s; keeping registry version %d", error, self._registry.current.version)
            self._unreachable = True
            self._last_errors = (error,)
            return False
        self._unreachable = False
        self.last_read = scan.read
        for rel in scan.emptied.keys() - self._emptied.keys():  # once per emptying, not per look
            logger.info("registry config %s is empty; its objects stay unless it is still empty in %.0fs (a write in "
                        "progress?)", os.path.join(self._path, rel), EMPTY_SETTLE)  # fmt: skip
        self._emptied = scan.emptied
        if not scan.changed and not self._pending:
            return False
        errors = self._take(scan)
        if errors:
            for error in errors:
                logger.warning("%s", error)
            logger.warning(
                "registry config %s has %d error(s); keeping registry version %d",
                self._path,
                len(errors),
                self._registry.current.version,
            )
            return False
        before = self._registry.current.version
        return self._install().version != before

    def _take(self, scan: _Scan) -> tuple[ConfigError, ...]:
        """Take in the scan's changed files; the folder's errors (none: the registry may take the changes)."""
        self._files = scan.files
        self.last_read = scan.read
        self._pending |= scan.changed
        for rel in scan.changed:
            found = scan.files.get(rel)
            self._index.replace(rel, found.parsed if found is not None else None)
        skipped: Counter[str] = Counter()
        for f in scan.files.values():
            skipped.update(dict(f.parsed.skipped))
        self._last_skipped = FrozenMap(sorted(skipped.items()))
        if self._index.clean:
            self._last_errors = ()
        else:
            # Only a broken folder pays for the folder-wide pass: it names each conflict's first definition.
            self._last_errors = combine(f.parsed for _, f in sorted(scan.files.items())).errors
        return self._last_errors

    def _install(self) -> RegistrySnapshot:
        """The registry takes what the files changed since it last took the folder: their objects, and the
        removal of what they held and no file holds now (costs the changed files, not the folder)."""
        objects: list[RegistryObject] = []
        gone: list[ObjectKey] = []
        for rel in self._pending:
            found = self._files.get(rel)
            held = [loc.obj for loc in found.parsed.located] if found is not None else []
            objects += held
            gone += [key for key in self._provided.pop(rel, ()) if key not in self._index.keys]
            if found is not None:
                self._provided[rel] = [obj.key for obj in held]
        snapshot = self._registry.apply(objects, gone)
        logger.info(
            "registry version %d from %s: %d objects (%d file(s) read, %d objects in them, %d gone)",
            snapshot.version, self._path, len(snapshot), len(self._pending), len(objects), len(gone),
        )  # fmt: skip
        self._pending.clear()
        if self._last_skipped:
            skipped = ", ".join(f"{kind} x{n}" for kind, n in self._last_skipped.items())
            logger.info("ignored kinds the registry does not read: %s", skipped)
        return snapshot

    async def run(self) -> None:
        """Watch the folder until cancelled: an event (or the slow rescan) leads to a look."""
        wake = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(wake))
            tg.create_task(self._rescan(wake))
            while True:
                if self._emptied:  # look again once an emptied file has had EMPTY_SETTLE to be written
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(EMPTY_SETTLE + 0.05):
                            await wake.wait()
                else:
                    await wake.wait()
                wake.clear()
                try:
                    await self.poll_once()
                except Exception:
                    # A bug in one reload must not stop the watcher; the last good snapshot stays.
                    logger.exception("registry reload of %s failed", self._path)

    async def _watch(self, wake: asyncio.Event) -> None:
        while True:
            try:
                # A save is several events in a few ms (write, rename, ConfigMap symlink swaps): gather 30 ms of
                # them into one look (the publisher's own debounce follows). `yield_on_timeout`: an empty batch
                # every second, the first of which says the watch is in place, so a look then catches what
                # changed while it was being set up.
                watching = False
                async for events in watchfiles.awatch(
                    self._path, watch_filter=None, debounce=30, step=10, recursive=True,
                    rust_timeout=1000, yield_on_timeout=True,
                ):  # fmt: skip
                    if events or not watching:
                        wake.set()
                    watching = True
            except (OSError, RuntimeError) as err:
                # The folder went away (or cannot be watched): the rescan keeps looking; watch again later.
                logger.debug("watching %s: %s", self._path, err)
            await asyncio.sleep(self._rescan_interval)

    async def _rescan(self, wake: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self._rescan_interval)
            wake.set()


def _os_reason(e: OSError) -> str:
    return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
