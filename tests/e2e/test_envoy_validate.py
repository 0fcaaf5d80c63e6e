"""Real Envoy 1.40 (`--mode validate`) accepts every generated sidecar configuration.

Each sidecar's resources are checked twice: exactly as generated (static listeners and clusters whose EDS and
RDS come from ADS, as a bootstrap with an `xds-grpc` cluster declares it), and in the static form with EDS and
RDS inlined, which makes Envoy validate the ClusterLoadAssignments and RouteConfigurations too. A tampered
configuration must fail, so that a pass means something.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format, message

from tests.support.envoy import validate as envoy_validate
from tests.support.envoy_cases import CASES, Sidecar, mesh_of
from ztcore.envoy import resource_name
from ztcore.envoy.bootstrap import ads_bootstrap, node, static_bootstrap
from ztcore.envoy.sidecar import SharedConfig, build_for_proxy
from ztcore.xds import typeurls

pytestmark = pytest.mark.slow

PARALLEL = 2


def sidecars() -> list[tuple[str, Sidecar]]:
    """The golden cases' sidecars, plus one per pod of examples/mesh."""
    out = [(case, s) for case, group in CASES.items() for s in group]
    named = {s.golden for case, s in out if case == "examples-mesh"}
    for w in mesh_of("examples-mesh").workloads:
        if f"{w.namespace}.{w.name}" not in named:
            out.append(("examples-mesh", Sidecar(w.name, w.namespace, str(w.addresses[0]))))
    return out


def bootstraps(sidecar: Sidecar, built: Mapping[str, Sequence[message.Message]]) -> dict[str, message.Message]:
    n = node(
        sidecar.node_id, {"NAMESPACE": sidecar.namespace, "INTERCEPTION_MODE": sidecar.interception, **sidecar.metadata}
    )
    return {
        "ads": ads_bootstrap(
            n,
            xds_address=("127.0.0.1", 15010),
            sds_socket="/var/run/secrets/workload-spiffe-uds/socket",
            listeners=built[typeurls.LISTENER],
            clusters=built[typeurls.CLUSTER],
        ),
        "static": static_bootstrap(n, built, sds_socket="/var/run/secrets/workload-spiffe-uds/socket"),
    }


async def validate(config: message.Message, path: Path, limit: asyncio.Semaphore) -> tuple[int, str]:
    return await envoy_validate(json_format.MessageToJson(config), path, limit)


async def test_envoy_accepts_every_generated_sidecar(tmp_path: Path) -> None:
    meshes = {case: mesh_of(case) for case in CASES}
    shared = {case: SharedConfig.of(mesh) for case, mesh in meshes.items()}
    limit = asyncio.Semaphore(PARALLEL)
    jobs = {}
    for case, sidecar in sidecars():
        built = build_for_proxy(meshes[case], sidecar.proxy, shared=shared[case])
        assert built[typeurls.LISTENER] and built[typeurls.CLUSTER]
        for form, config in bootstraps(sidecar, built).items():
            label = f"{case}/{sidecar.golden}/{form}"
            path = tmp_path / f"{case}.{sidecar.golden}.{form}.json"
            jobs[label] = asyncio.ensure_future(validate(config, path, limit))
    results = {label: await job for label, job in jobs.items()}
    failed = {label: out[-600:] for label, (rc, out) in results.items() if rc != 0 or " OK" not in out}
    assert not failed, failed
    assert len(results) >= 2 * 14


def find(built: Mapping[str, Sequence[Any]], type_url: str, match: Callable[[str], bool]) -> Any:
    return next(m for m in built[type_url] if match(resource_name(m)))


async def test_envoy_refuses_a_tampered_configuration(tmp_path: Path) -> None:
    """The validation is real: a repeated route domain and an unspecified SAN type are both refused."""
    limit = asyncio.Semaphore(PARALLEL)
    sidecar = CASES["ports"][0]
    built = build_for_proxy(mesh_of("ports"), sidecar.proxy)
    route = find(built, typeurls.ROUTE, lambda name: name == "80")
    route.virtual_hosts[1].domains.append(route.virtual_hosts[0].domains[0])
    rc, out = await validate(bootstraps(sidecar, built)["static"], tmp_path / "dup.json", limit)
    assert rc != 0 and "Duplicate entry of domain api.other.svc.cluster.local in route 80" in out, out[-600:]

    built = build_for_proxy(mesh_of("ports"), sidecar.proxy)
    cluster = find(built, typeurls.CLUSTER, lambda name: name.startswith("outbound|5432||db."))
    tls = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(tls)
    tls.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names[
        0
    ].san_type = 0
    cluster.transport_socket.typed_config.Pack(tls)
    rc, out = await validate(bootstraps(sidecar, built)["ads"], tmp_path / "san.json", limit)
    assert rc != 0 and "SubjectAltNameMatcherValidationError.SanType" in out, out[-600:]
