from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import RunningZtd, running_ztd, write_yaml

MESH = """
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-a, namespace: istio-system}
spec: {serviceAccountName: ztunnel, nodeName: node-a}
status: {podIP: 10.10.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-1, namespace: shop, uid: 6b1f0c0e-0000-4000-8000-000000000001}
spec: {serviceAccountName: frontend, nodeName: node-a}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop}
spec: {serviceAccountName: cart, nodeName: node-b}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: shop}
spec: {serviceAccountName: legacy, nodeName: node-a}
status: {phase: Failed, podIP: 10.244.1.99}
"""


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    write_yaml(tmp_path / "mesh", "mesh.yaml", MESH)
    return tmp_path / "mesh"


@pytest.fixture
async def ztd(tmp_path: Path, mesh_dir: Path) -> AsyncIterator[RunningZtd]:
    async with running_ztd(tmp_path, config_dir=mesh_dir) as running:
        yield running
