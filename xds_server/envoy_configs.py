"""The publish side of Envoy configuration: each connected Envoy's resources, built and kept in the SnapshotCache.

The ADS transport (`xds_server.server`) never builds configuration. As in go-control-plane, where the server
only answers from the snapshot cache and the application sets each node's snapshot when told a node
connected, the transport binds an Envoy stream (`sidecar~`/`router~` node) to a cache scope of its own and
hands the proxy to `EnvoyConfigs.connect`, which builds its resources with the `EnvoyGenerator`
(`ztcore.envoy`) off the event loop and installs them under that scope before the stream is served.
After every publish each connected proxy is rebuilt from the new translation; a proxy whose rebuild fails
keeps its last good configuration. `disconnect` drops the scope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from google.protobuf import message

from xds_server.publish import Published, Publisher
from xds_server.server import SERVED_TYPES
from ztcore.envoy import EnvoyGenerator, Proxy, resource_name
from ztcore.mesh.translate import Translation
from ztcore.untrusted import clip
from ztcore.xds import typeurls
from ztcore.xds.cache import GLOBAL_SCOPE, SnapshotCache
from ztcore.xds.grpc_adapter import NODE_ID_LIMIT
from ztcore.xds.resources import Resource

log = logging.getLogger(__name__)

ENVOY_TYPES = (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE)

Built = dict[str, tuple[Resource, ...]]


# -- pure ----------------------------------------------------------------------------------------------------


def pack_envoy(generated: Mapping[str, Sequence[message.Message]]) -> Built:
    """Generator output → resources per type; every Envoy type is present (empty when nothing was built).
    ValueError for a message of the wrong type or a name given twice (the client would NACK it)."""
    out: Built = {t: () for t in ENVOY_TYPES}
    for type_url, messages in generated.items():
        if type_url not in SERVED_TYPES:
            raise ValueError(f"the Envoy builder returned resources of unknown type {type_url}")
        packed = tuple(Resource.pack(resource_name(m), m) for m in messages)
        names = [r.name for r in packed]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"the Envoy builder returned duplicate {typeurls.short_name(type_url)} names {dupes}")
        for r in packed:
            if r.type_url != type_url:
                raise ValueError(f"{r.name!r} is a {r.type_url}, returned as {type_url}")
        out[type_url] = packed
    return out


def push_rank(type_url: str) -> int:
    """Make-before-break order: clusters and endpoints before the listeners and routes that use them."""
    return typeurls.PUSH_ORDER.index(type_url) if type_url in typeurls.PUSH_ORDER else len(typeurls.PUSH_ORDER)


# -- the IO shell ----------------------------------------------------------------------------------------------


class EnvoyConfigs:
    """Owns the generator: builds and installs the resources of every connected Envoy proxy. Use from the
    event loop (the cache is single-threaded); only the generator runs in worker threads."""

    def __init__(self, cache: SnapshotCache, publisher: Publisher, generator: EnvoyGenerator) -> None:
        self._cache = cache
        self._publisher = publisher
        self._generator = generator
        self._proxies: dict[str, Proxy] = {}  # connected proxies by scope
        publisher.add_listener(self.rebuild)

    @property
    def connected(self) -> Mapping[str, Proxy]:
        """The connected proxies by scope (a copy)."""
        return dict(self._proxies)

    async def connect(self, scope: str, proxy: Proxy) -> None:
        """Build `proxy`'s resources from the translation served now and install them under `scope`; every
        publish rebuilds them from then on. ProxyError: the generator refuses this proxy; any other exception
        is a bug in the generator. On failure nothing is installed and the proxy is not connected."""
        if scope == GLOBAL_SCOPE:
            raise ValueError("an Envoy proxy needs a scope of its own, not the global scope")
        if scope in self._proxies:
            raise ValueError(f"scope {scope!r} is already bound to {clip(self._proxies[scope].node_id, 120)!r}")
        translation = self._publisher.translation
        resources = await asyncio.to_thread(self._build, translation, proxy)
        self._install(scope, resources)
        self._proxies[scope] = proxy

    def disconnect(self, scope: str) -> None:
        """The proxy's stream ended: forget it and its resources (a scope not connected is ignored)."""
        if self._proxies.pop(scope, None) is not None:
            self._cache.drop_scope(scope)

    async def rebuild(self, published: Published) -> None:
        """After a push: rebuild every connected proxy from the new translation (off the loop)."""
        connected = list(self._proxies.items())
        if not connected:
            return  # no Envoy: the translation is never even assembled
        translation = await asyncio.to_thread(lambda: published.translation)

        def build_all() -> list[tuple[str, Proxy, Built | None]]:
            out: list[tuple[str, Proxy, Built | None]] = []
            for scope, proxy in connected:
                try:
                    out.append((scope, proxy, self._build(translation, proxy)))
                except Exception:
                    # Keep serving this proxy its last good configuration.
                    log.exception(
                        "rebuilding Envoy configuration for %s failed; keeping the last one",
                        clip(proxy.node_id, NODE_ID_LIMIT),
                    )
                    out.append((scope, proxy, None))
            return out

        for scope, proxy, resources in await asyncio.to_thread(build_all):
            # A proxy that disconnected while it was rebuilt keeps no resources.
            if resources is not None and self._proxies.get(scope) is proxy:
                self._install(scope, resources)

    def _build(self, translation: Translation, proxy: Proxy) -> Built:
        return pack_envoy(self._generator(translation, proxy))

    def _install(self, scope: str, resources: Mapping[str, tuple[Resource, ...]]) -> None:
        for type_url in sorted(resources, key=push_rank):
            # Never-set empty types are skipped: the cache would keep an empty entry for them after close.
            if resources[type_url] or self._cache.resources(type_url, scope):
                self._cache.set_resources(type_url, resources[type_url], scope=scope)
