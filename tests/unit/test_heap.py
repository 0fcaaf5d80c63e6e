"""ztd's heap after pushes (xds_server.main.freeze_heap): long-lived objects frozen, and no garbage with them.

Measured cause of the leak this pins (issue: RSS +19 MB per config change at 1,000 pods): every reload left
the YAML parse trees as cyclic garbage (a throwaway SafeLoader, whose parser state is a bound method, held
every node and mark), and gc.freeze() after the push froze them before the collector had freed them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from xds_server.main import freeze_heap, sweep_heap
from xds_server.publish import Publisher
from ztcore.mesh.registry.files import FileRegistrySource
from ztcore.mesh.registry.store import Registry
from ztcore.mesh.translate import TranslateOptions
from ztcore.xds.cache import SnapshotCache

PODS = 300


def mesh(version: int) -> str:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n"]
    for i in range(PODS):
        label = f"v{version}" if i == 0 else "v1"  # one pod changes per reload, as an operator's edit would
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: shop, labels: {{app: a, version: "
            f"{label}}}}}\nspec: {{serviceAccountName: sa}}\nstatus: {{podIP: 10.1.{i // 250}.{i % 250 + 1}}}\n"
        )
    return "---\n".join(docs)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session gets its collector back


async def test_reloads_and_pushes_freeze_no_garbage(tmp_path: Path, unfrozen: None) -> None:
    folder = tmp_path / "mesh"
    folder.mkdir()
    (folder / "mesh.yaml").write_text(mesh(1))
    registry = Registry()
    source = FileRegistrySource(folder, registry)
    await source.load_initial()
    publisher = Publisher(registry, SnapshotCache(), options=TranslateOptions())
    await publisher.publish(registry.current)
    await freeze_heap(None)
    frozen = []
    for version in range(2, 14):
        (folder / "mesh.yaml").write_text(mesh(version))
        os.utime(folder / "mesh.yaml", ns=(time.time_ns(), time.time_ns() + version))  # a new fingerprint
        assert await source.poll_once()  # the folder was re-read and re-parsed: its garbage is there
        await publisher.publish(registry.current)
        await freeze_heap(None)  # what ztd runs after each push
        frozen.append(gc.get_freeze_count())
    per_push = (frozen[-1] - frozen[2]) / (len(frozen) - 3)
    # the one changed pod's new objects are frozen; the reload's ~30,000 garbage objects are not
    assert per_push < 500, per_push


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_periodic_sweep_frees_what_died_in_a_cycle_after_it_was_frozen(unfrozen: None) -> None:
    """A stream's tasks and frames are alive when a push freezes the heap, and die in cycles later."""
    alive = _Cycle()
    freed = asyncio.Event()
    weakref.finalize(alive, freed.set)
    await freeze_heap(None)
    del alive  # now cyclic garbage, but frozen: no ordinary collection reaches it
    gc.collect()
    assert not freed.is_set()
    sweeper = asyncio.create_task(sweep_heap(0.01))
    try:
        await asyncio.wait_for(freed.wait(), 5)
    finally:
        sweeper.cancel()
    assert gc.get_freeze_count() > 0  # and what is alive is frozen again
