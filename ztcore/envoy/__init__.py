"""Envoy configuration builders: pure functions from a `Translation` and one proxy to Envoy resources.

The publish side knows builders only through `EnvoyGenerator` (xds_server/envoy_configs.py): it calls the
generator when an Envoy (`sidecar~`/`router~` node) connects and after every registry change, packs each
returned message into a versioned resource (content hash, so unchanged resources keep their version and are
not resent) and installs it in that proxy's cache scope, which the ADS server serves to that proxy alone.
The generator is `ztcore.envoy.sidecar.build_for_proxy` when that module exists, else `no_resources`.

Contract for a generator:
- pure: no IO, no clock, no asyncio; it may run in a worker thread, so it shares nothing mutable;
- keys are type URLs (`ztcore.xds.typeurls`: CLUSTER, ENDPOINT, LISTENER, ROUTE, ...); a type it returns
  nothing for is served empty; values are the messages themselves (named by `resource_name`);
- it is called with the same `Translation` object for every proxy of one push: whatever it derives from the
  translation alone (a mesh index) may be cached on that object's identity while it holds a reference;
- a proxy it cannot build for raises `ProxyError` (the stream is refused with its message).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from google.protobuf import message

from ztcore.envoy.proxy import Proxy, ProxyError
from ztcore.mesh.translate import Translation

ENVOY_MODULE = "ztcore.envoy.sidecar"

__all__ = ["EnvoyGenerator", "Proxy", "ProxyError", "load_generator", "no_resources", "resource_name"]


class EnvoyGenerator(Protocol):
    def __call__(self, translation: Translation, proxy: Proxy) -> Mapping[str, Sequence[message.Message]]: ...


def no_resources(translation: Translation, proxy: Proxy) -> Mapping[str, Sequence[message.Message]]:
    """The generator while no Envoy builder is installed: every Envoy type is served empty."""
    return {}


def resource_name(msg: message.Message) -> str:
    """The xDS name of an Envoy resource: `cluster_name` for a ClusterLoadAssignment, else `name`."""
    fields = msg.DESCRIPTOR.fields_by_name
    key = "cluster_name" if "cluster_name" in fields and "name" not in fields else "name"
    if key not in fields:
        raise ValueError(f"{msg.DESCRIPTOR.full_name} has no name field")
    return str(getattr(msg, key))


def load_generator() -> EnvoyGenerator:
    """`build_for_proxy` of ztcore/envoy/sidecar.py, or `no_resources` when that file is absent.

    Only a missing module falls back: an error inside it propagates, so a broken builder is not hidden.
    """
    if importlib.util.find_spec(ENVOY_MODULE) is None:
        return no_resources
    module = importlib.import_module(ENVOY_MODULE)
    return cast(EnvoyGenerator, module.build_for_proxy)
