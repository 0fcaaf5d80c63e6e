"""The folder behind `ztd --config-dir`: load it, and keep the registry in step with it.

The whole folder is reloaded on any change; a folder with any error never replaces the last good snapshot,
so a half-saved file cannot take policies away from a running mesh.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Sequence

from xds_server.registry.objects import FrozenMap, RegistryObject
from xds_server.registry.parse import ConfigError, ParseResult, parse_sources
from xds_server.registry.store import Registry, RegistrySnapshot

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

# (relative path, mtime_ns, size, inode) of every config file: any difference means "reload".
Fingerprint = tuple[tuple[str, int, int, int], ...]


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


def fingerprint(root: str | os.PathLike[str]) -> Fingerprint:
    out = []
    for rel in config_files(root):
        try:
            st = os.stat(os.path.join(root, rel))  # follows ConfigMap symlinks to the real file
        except OSError:
            out.append((rel, -1, -1, -1))  # vanished or dangling; the reload will report it
            continue
        out.append((rel, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


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


def _scan(root: str, known: Fingerprint | None) -> tuple[Fingerprint, ParseResult | None]:
    # Fingerprint before reading: a write that lands during the read changes the next fingerprint,
    # so it is picked up by the next poll rather than lost.
    current = fingerprint(root)
    if current == known:
        return current, None
    return current, read_dir(root)


class FileRegistrySource:
    """Feeds a Registry from a folder, polling it for changes (no inotify dependency)."""

    def __init__(self, path: str | os.PathLike[str], registry: Registry, poll_interval: float = 0.5) -> None:
        self._path = os.fspath(path)
        self._registry = registry
        self._poll_interval = poll_interval
        self._fingerprint: Fingerprint | None = None
        self._last_errors: tuple[ConfigError, ...] = ()
        self._last_skipped: FrozenMap[str, int] = FrozenMap()

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
            current, result = await asyncio.to_thread(_scan, self._path, None)
        except OSError as e:
            raise RegistryLoadError(f"cannot load registry from {self._path}: {_os_reason(e)}") from e
        assert result is not None
        self._fingerprint = current
        self._last_errors = result.errors
        self._last_skipped = result.skipped
        if result.errors:
            raise RegistryLoadError(f"{len(result.errors)} error(s) in registry config {self._path}", result.errors)
        snapshot = self._registry.replace(result.objects)
        self._log_loaded(snapshot, result)
        return snapshot

    async def poll_once(self) -> bool:
        """Reload if the folder changed; True if a new snapshot was installed."""
        try:
            current, result = await asyncio.to_thread(_scan, self._path, self._fingerprint)
        except OSError as e:
            error = ConfigError(self._path, 0, f"cannot read registry config: {_os_reason(e)}")
            if self._last_errors != (error,):  # once per outage, not every poll
                logger.warning("%s; keeping registry version %d", error, self._registry.current.version)
            self._last_errors = (error,)
            self._fingerprint = None  # reload as soon as the folder is back
            return False
        if result is None:
            return False
        self._fingerprint = current
        self._last_errors = result.errors
        self._last_skipped = result.skipped
        if result.errors:
            for error in result.errors:
                logger.warning("%s", error)
            logger.warning(
                "registry config %s has %d error(s); keeping registry version %d",
                self._path,
                len(result.errors),
                self._registry.current.version,
            )
            return False
        before = self._registry.current.version
        snapshot = self._registry.replace(result.objects)
        self._log_loaded(snapshot, result)
        return snapshot.version != before

    async def run(self) -> None:
        """Load (unless load_initial already did and nothing changed), then watch until cancelled."""
        while True:
            try:
                await self.poll_once()
            except Exception:
                # A bug in one reload must not stop the watcher; the last good snapshot stays.
                logger.exception("registry reload of %s failed", self._path)
            await asyncio.sleep(self._poll_interval)

    def _log_loaded(self, snapshot: RegistrySnapshot, result: ParseResult) -> None:
        logger.info(
            "registry version %d from %s: %d objects (digest %s)",
            snapshot.version,
            self._path,
            len(snapshot),
            snapshot.digest[:12],
        )
        if result.skipped:
            skipped = ", ".join(f"{kind} x{n}" for kind, n in result.skipped.items())
            logger.info("ignored kinds the registry does not read: %s", skipped)


def _os_reason(e: OSError) -> str:
    return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
