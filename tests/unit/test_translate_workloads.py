"""Registry -> Workload/Service details around the goldens: the wire edge, determinism, protocols, identity."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from protos.istio.workload import workload_pb2
from ztcore.mesh.registry.files import read_dir
from ztcore.mesh.registry.objects import ObjectMeta, Service, ServicePort
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate import TranslateOptions, translate
from ztcore.mesh.translate.workloads import WorkloadSettings, app_protocol, build_service
from ztcore.model.workload import AppProtocol, Workload
from ztcore.model.workload import Service as WdsService

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"


def _examples() -> RegistrySnapshot:
    result = read_dir(EXAMPLES)
    assert result.errors == ()
    return RegistrySnapshot(result.objects)


def test_every_resource_survives_the_wire() -> None:
    translation = translate(_examples())
    assert translation.workloads and translation.services
    for w in translation.workloads:
        wire = w.to_address_pb().SerializeToString()
        assert Workload.from_pb(workload_pb2.Address.FromString(wire).workload) == w
    for s in translation.services:
        wire = s.to_address_pb().SerializeToString()
        assert WdsService.from_pb(workload_pb2.Address.FromString(wire).service) == s


def test_translation_does_not_depend_on_input_order() -> None:
    objects = list(_examples().objects())
    first = translate(RegistrySnapshot(objects))
    random.Random(7).shuffle(objects)
    assert translate(RegistrySnapshot(objects)) == first


def test_identity_and_lookup() -> None:
    translation = translate(_examples())
    debug = translation.pod_workload("shop", "debug")
    assert debug is not None
    assert (debug.trust_domain, debug.service_account) == ("", "default")
    assert debug.identity().uri == "spiffe://cluster.local/ns/shop/sa/default"
    assert debug.aliases() == ("/10.244.2.30",)
    assert translation.pod_workload("shop", "nope") is None
    custom = translate(_examples(), TranslateOptions(trust_domain="corp.example", cluster_id="c1"))
    ledger = custom.pod_workload("payments", "ledger-1")
    assert ledger is not None and ledger.uid == "c1//Pod/payments/ledger-1"
    assert ledger.identity().uri == "spiffe://corp.example/ns/payments/sa/ledger"


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        (ServicePort(80, 80, "http"), AppProtocol.HTTP11),
        (ServicePort(80, 80, "HTTP-web"), AppProtocol.HTTP11),
        (ServicePort(80, 80, "http2"), AppProtocol.HTTP2),
        (ServicePort(80, 80, "grpc-api"), AppProtocol.GRPC),
        (ServicePort(80, 80, "grpc-web-x"), AppProtocol.UNKNOWN),
        (ServicePort(443, 443, "https"), AppProtocol.TLS),
        (ServicePort(443, 443, "tls-x"), AppProtocol.TLS),
        (ServicePort(1, 1, "tcp"), AppProtocol.TCP),
        (ServicePort(1, 1, "redis"), AppProtocol.UNKNOWN),
        (ServicePort(1, 1, "foo"), AppProtocol.UNKNOWN),
        (ServicePort(53, 53, ""), AppProtocol.TCP),  # well-known, unnamed
        (ServicePort(53, 53, "dns", "UDP"), AppProtocol.UNKNOWN),
        (ServicePort(1, 1, "tcp", app_protocol="http"), AppProtocol.HTTP11),  # appProtocol wins
        (ServicePort(1, 1, "", app_protocol="kubernetes.io/h2c"), AppProtocol.HTTP2),
        (ServicePort(1, 1, "", app_protocol="kubernetes.io/wss"), AppProtocol.HTTP11),
        (ServicePort(3306, 1, "mysql"), AppProtocol.UNKNOWN),  # a known protocol, so no port fallback
    ],
)
def test_app_protocol(port: ServicePort, expected: AppProtocol) -> None:
    assert app_protocol(port) is expected


def test_external_name_service_is_not_sent() -> None:
    svc = Service(ObjectMeta("ext", "ns"), type="ExternalName", ports=(ServicePort(80, 80, "http"),))
    assert build_service(svc, WorkloadSettings()) is None
