"""The AuthorizationPolicy golden cases (tests/golden/envoy_rbac/<case>-in.yaml: one Pod, its policies) and how
to read them.

Shared by the RBAC builder goldens (tests/unit/test_build_rbac.py), the evaluator (tests/unit/test_rbac_eval.py)
and real Envoy's validation (tests/e2e/test_envoy_rbac_validate.py), so all three build from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ztcore.mesh.registry.objects import AuthorizationPolicy, Pod
from ztcore.mesh.registry.parse import parse_text

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "envoy_rbac"
ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True)
class Options:
    trust_domain: str = "cluster.local"
    aliases: tuple[str, ...] = ()


# Cases built with other mesh options than the default ones.
OPTIONS = {"trust-domain-aliases": Options("example.org", ("old.example",))}


def cases() -> list[str]:
    return sorted(p.name.removesuffix("-in.yaml") for p in GOLDEN.glob("*-in.yaml"))


def load(text: str, source: str = "test") -> tuple[Pod | None, list[AuthorizationPolicy]]:
    result = parse_text(text, source)
    assert [str(e) for e in result.errors] == []
    pods = [o for o in result.objects if isinstance(o, Pod)]
    assert len(pods) <= 1, "one Pod per case: the sidecar the filters are for"
    return (pods[0] if pods else None), [o for o in result.objects if isinstance(o, AuthorizationPolicy)]
