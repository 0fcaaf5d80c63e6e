"""What keeps a bridge small: imports it does not need stay out, repeated strings and identities are shared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ipsec_bridge.state import ViewSettings, build_view
from protos.istio.workload import workload_pb2 as pb
from ztcore.model.workload import Workload

REPO = Path(__file__).resolve().parents[2]


def test_a_bridge_fed_over_xds_loads_neither_the_translator_nor_yaml() -> None:
    """The --config-dir source (ztd's registry and translator) and yaml are imported only with their flags."""
    unwanted = ["yaml", "ztcore.mesh.translate", "watchfiles"]
    probe = f"import sys, ipsec_bridge.main; print([m for m in {unwanted!r} if m in sys.modules])"
    run = [sys.executable, "-c", probe]
    out = subprocess.run(run, capture_output=True, text=True, check=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]"


def _workload(i: int) -> Workload:
    msg = pb.Workload(
        uid=f"Kubernetes//Pod/apps/pod-{i}", name=f"pod-{i}", namespace="apps", addresses=[bytes([10, 1, 0, i + 1])],
        trust_domain="cluster.local", service_account="client", node="node-a", cluster_id="Kubernetes",
    )  # fmt: skip
    return Workload.from_pb(msg)


def test_decoded_workloads_share_their_repeated_strings_and_identities() -> None:
    a, b = _workload(1), _workload(2)
    for field in ("namespace", "trust_domain", "service_account", "node", "cluster_id"):
        assert getattr(a, field) is getattr(b, field), field  # one string, not one per workload
    assert a.name is not b.name
    settings = ViewSettings.parse(["10.0.0.0/8"], "cluster.local", "istio-system/ztunnel")
    view = build_view([a, b], (), settings, 1)
    first, second = (view.pod(w.addresses[0]) for w in (a, b))
    assert first is not None and second is not None
    assert first.identity is second.identity  # one Identity per service account, not one per pod
