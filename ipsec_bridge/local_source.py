"""The bridge's state from a local folder of Kubernetes YAML (--config-dir, ztd's format), translated as ztd
translates it, instead of from ztd over xDS. Its own module: the registry, the translator and the file watcher
cost a bridge ~2 MiB of resident imports (bench/bridge_memory.py) that one fed over xDS (the usual one) never
loads."""

from __future__ import annotations

import asyncio
import logging
import os

from ipsec_bridge.state import NodeView, StateStore
from ztcore.mesh.registry.files import FileRegistrySource, RegistryLoadError
from ztcore.mesh.registry.store import Registry
from ztcore.mesh.translate import TranslateOptions, translate

log = logging.getLogger(__name__)


class LocalConfigSource:
    """A folder of Kubernetes YAML (ztd's --config-dir format), translated as ztd translates it."""

    def __init__(
        self, path: str | os.PathLike[str], store: StateStore, options: TranslateOptions, poll_interval: float = 0.5
    ) -> None:
        self._registry = Registry()
        self._files = FileRegistrySource(path, self._registry, poll_interval)
        self._store = store
        self._options = options

    async def load_initial(self) -> NodeView:
        """RegistryLoadError when the folder is missing or has errors (the bridge then refuses to start)."""
        await self._files.load_initial()
        return await self._apply()

    async def _apply(self) -> NodeView:
        translation = await asyncio.to_thread(translate, self._registry.current, self._options)
        view = self._store.replace(translation.workloads, translation.authorizations)
        log.info(
            "local config: %d workloads, %d policies (registry version %d)",
            len(translation.workloads),
            len(translation.authorizations),
            self._registry.current.version,
        )
        return view

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._files.run(), name="local-config-poll")
            async for _ in self._registry.watch(self._registry.current.version):
                await self._apply()


__all__ = ["LocalConfigSource", "RegistryLoadError", "TranslateOptions"]
