"""Wire-compatibility checks for ztdpu's Istio protos (protos/istio/...).

The expected schema below is written by hand from the Istio protocol
reference (istio-protocol.md sections 1.1, 3.3 and 3.4), NOT derived from the
generated code, so a wrong number/type in a .proto file fails here.

Type notation mirrors .proto syntax: ``"string"``, ``"repeated bytes"``,
``"optional uint32"``, ``"map<string, istio.workload.PortList>"``; message and
enum types are written as full names (an enum is any name listed in ENUMS).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor, descriptor_pb2, unknown_fields
from google.protobuf.wrappers_pb2 import UInt32Value

from protos.istio.security import authorization_pb2
from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from protos.istio.workload import workload_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]

WL = "istio.workload."
SEC = "istio.security."

# --------------------------------------------------------------------------
# Expected schema: message full name -> {field name: (number, type)}
# --------------------------------------------------------------------------
MESSAGES: dict[str, dict[str, tuple[int, str]]] = {
    # ---- istio.v1.auth (reference 1.1) ----
    "istio.v1.auth.IstioCertificateRequest": {
        "csr": (1, "string"),
        "validity_duration": (3, "int64"),
        "metadata": (4, "google.protobuf.Struct"),
    },
    "istio.v1.auth.IstioCertificateResponse": {
        "cert_chain": (1, "repeated string"),
    },
    # ---- istio.workload (reference 3.3) ----
    WL + "Address": {
        "workload": (1, WL + "Workload"),
        "service": (2, WL + "Service"),
    },
    WL + "Service": {
        "name": (1, "string"),
        "namespace": (2, "string"),
        "hostname": (3, "string"),
        "addresses": (4, "repeated " + WL + "NetworkAddress"),
        "ports": (5, "repeated " + WL + "Port"),
        "subject_alt_names": (6, "repeated string"),
        "waypoint": (7, WL + "GatewayAddress"),
        "load_balancing": (8, WL + "LoadBalancing"),
        "ip_families": (9, WL + "IPFamilies"),
        "extensions": (10, "repeated " + WL + "Extension"),
        "canonical": (11, "bool"),
        "ingress_use_waypoint": (12, "bool"),
        "weighted_waypoints": (13, "repeated " + WL + "WeightedWaypoint"),
        "visibility": (14, WL + "Service.Visibility"),
    },
    WL + "Workload": {
        "uid": (20, "string"),
        "name": (1, "string"),
        "namespace": (2, "string"),
        "addresses": (3, "repeated bytes"),
        "hostname": (21, "string"),
        "network": (4, "string"),
        "tunnel_protocol": (5, WL + "TunnelProtocol"),
        "trust_domain": (6, "string"),
        "service_account": (7, "string"),
        "waypoint": (8, WL + "GatewayAddress"),
        "network_gateway": (19, WL + "GatewayAddress"),
        "node": (9, "string"),
        "canonical_name": (10, "string"),
        "canonical_revision": (11, "string"),
        "workload_type": (12, WL + "WorkloadType"),
        "workload_name": (13, "string"),
        "native_tunnel": (14, "bool"),
        "application_tunnel": (23, WL + "ApplicationTunnel"),
        "services": (22, "map<string, " + WL + "PortList>"),
        "authorization_policies": (16, "repeated string"),
        "status": (17, WL + "WorkloadStatus"),
        "cluster_id": (18, "string"),
        "locality": (24, WL + "Locality"),
        "network_mode": (25, WL + "NetworkMode"),
        "extensions": (26, "repeated " + WL + "Extension"),
        "capacity": (27, "google.protobuf.UInt32Value"),
    },
    WL + "Locality": {
        "region": (1, "string"),
        "zone": (2, "string"),
        "subzone": (3, "string"),
    },
    WL + "PortList": {
        "ports": (1, "repeated " + WL + "Port"),
    },
    WL + "Port": {
        "service_port": (1, "uint32"),
        "target_port": (2, "uint32"),
        "app_protocol": (3, WL + "AppProtocol"),
    },
    WL + "GatewayAddress": {
        "hostname": (1, WL + "NamespacedHostname"),
        "address": (2, WL + "NetworkAddress"),
        "hbone_mtls_port": (3, "uint32"),
    },
    WL + "WeightedWaypoint": {
        "destination": (1, WL + "GatewayAddress"),
        "weight": (2, "uint32"),
    },
    WL + "NetworkAddress": {
        "network": (1, "string"),
        "address": (2, "bytes"),
        "length": (3, "optional uint32"),
    },
    WL + "NamespacedHostname": {
        "namespace": (1, "string"),
        "hostname": (2, "string"),
    },
    WL + "ApplicationTunnel": {
        "protocol": (1, WL + "ApplicationTunnel.Protocol"),
        "port": (2, "uint32"),
    },
    WL + "LoadBalancing": {
        "routing_preference": (1, "repeated " + WL + "LoadBalancing.Scope"),
        "mode": (2, WL + "LoadBalancing.Mode"),
        "health_policy": (3, WL + "LoadBalancing.HealthPolicy"),
    },
    WL + "Extension": {
        "name": (1, "string"),
        "config": (2, "google.protobuf.Any"),
    },
    # ---- istio.security (reference 3.4) ----
    SEC + "Authorization": {
        "name": (1, "string"),
        "namespace": (2, "string"),
        "scope": (3, SEC + "Scope"),
        "action": (4, SEC + "Action"),
        "groups": (5, "repeated " + SEC + "Group"),
        "dry_run": (6, "bool"),
        "extensions": (7, "repeated " + WL + "Extension"),
    },
    SEC + "Group": {
        "rules": (1, "repeated " + SEC + "Rules"),
    },
    SEC + "Rules": {
        "matches": (2, "repeated " + SEC + "Match"),
    },
    SEC + "Match": {
        "namespaces": (1, "repeated " + SEC + "StringMatch"),
        "not_namespaces": (2, "repeated " + SEC + "StringMatch"),
        "service_accounts": (11, "repeated " + SEC + "ServiceAccountMatch"),
        "not_service_accounts": (12, "repeated " + SEC + "ServiceAccountMatch"),
        "principals": (3, "repeated " + SEC + "StringMatch"),
        "not_principals": (4, "repeated " + SEC + "StringMatch"),
        "source_ips": (5, "repeated " + SEC + "Address"),
        "not_source_ips": (6, "repeated " + SEC + "Address"),
        "destination_ips": (7, "repeated " + SEC + "Address"),
        "not_destination_ips": (8, "repeated " + SEC + "Address"),
        "destination_ports": (9, "repeated uint32"),
        "not_destination_ports": (10, "repeated uint32"),
        "extensions": (13, "repeated " + WL + "Extension"),
    },
    SEC + "Address": {
        "address": (1, "bytes"),
        "length": (2, "uint32"),
    },
    SEC + "ServiceAccountMatch": {
        "namespace": (1, "string"),
        "serviceAccount": (2, "string"),
    },
    SEC + "StringMatch": {
        "exact": (1, "string"),
        "prefix": (2, "string"),
        "suffix": (3, "string"),
        "presence": (4, "google.protobuf.Empty"),
    },
}

# Real (non-synthetic) oneofs: message -> {oneof name: member fields}.
ONEOFS: dict[str, dict[str, set[str]]] = {
    WL + "Address": {"type": {"workload", "service"}},
    WL + "GatewayAddress": {"destination": {"hostname", "address"}},
    SEC + "StringMatch": {"match_type": {"exact", "prefix", "suffix", "presence"}},
}

# Reserved numbers / names: message -> (numbers, names). Unlisted -> none.
RESERVED: dict[str, tuple[set[int], set[str]]] = {
    WL + "Workload": ({15}, set()),
    WL + "GatewayAddress": ({4}, {"hbone_single_tls_port"}),
}

ENUMS: dict[str, dict[str, int]] = {
    WL + "TunnelProtocol": {"NONE": 0, "HBONE": 1, "LEGACY_ISTIO_MTLS": 2},
    WL + "IPFamilies": {"AUTOMATIC": 0, "IPV4_ONLY": 1, "IPV6_ONLY": 2, "DUAL": 3},
    WL + "NetworkMode": {"STANDARD": 0, "HOST_NETWORK": 1},
    WL + "WorkloadStatus": {"HEALTHY": 0, "UNHEALTHY": 1},
    WL + "WorkloadType": {"DEPLOYMENT": 0, "CRONJOB": 1, "POD": 2, "JOB": 3},
    WL + "AppProtocol": {"UNKNOWN": 0, "HTTP11": 1, "HTTP2": 2, "GRPC": 3, "TCP": 4, "TLS": 5},
    WL + "Service.Visibility": {"PUBLIC": 0, "NAMESPACE": 1},
    WL + "ApplicationTunnel.Protocol": {"NONE": 0, "PROXY": 1},
    WL + "LoadBalancing.Scope": {
        "UNSPECIFIED_SCOPE": 0,
        "REGION": 1,
        "ZONE": 2,
        "SUBZONE": 3,
        "NODE": 4,
        "CLUSTER": 5,
        "NETWORK": 6,
    },
    WL + "LoadBalancing.Mode": {"UNSPECIFIED_MODE": 0, "STRICT": 1, "FAILOVER": 2, "PASSTHROUGH": 3},
    WL + "LoadBalancing.HealthPolicy": {"ONLY_HEALTHY": 0, "ALLOW_ALL": 1},
    SEC + "Scope": {"GLOBAL": 0, "NAMESPACE": 1, "WORKLOAD_SELECTOR": 2},
    SEC + "Action": {"ALLOW": 0, "DENY": 1},
}

# Proto file -> (module, proto package).
FILES = {
    "protos/istio/v1/auth/ca.proto": (ca_pb2, "istio.v1.auth"),
    "protos/istio/workload/workload.proto": (workload_pb2, "istio.workload"),
    "protos/istio/security/authorization.proto": (authorization_pb2, "istio.security"),
}

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

_FD = descriptor.FieldDescriptor
_SCALARS = {
    "double": _FD.TYPE_DOUBLE,
    "float": _FD.TYPE_FLOAT,
    "int64": _FD.TYPE_INT64,
    "uint64": _FD.TYPE_UINT64,
    "int32": _FD.TYPE_INT32,
    "fixed64": _FD.TYPE_FIXED64,
    "fixed32": _FD.TYPE_FIXED32,
    "bool": _FD.TYPE_BOOL,
    "string": _FD.TYPE_STRING,
    "bytes": _FD.TYPE_BYTES,
    "uint32": _FD.TYPE_UINT32,
    "sfixed32": _FD.TYPE_SFIXED32,
    "sfixed64": _FD.TYPE_SFIXED64,
    "sint32": _FD.TYPE_SINT32,
    "sint64": _FD.TYPE_SINT64,
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _walk_messages(descs) -> list[descriptor.Descriptor]:
    out = []
    for m in descs:
        if m.GetOptions().map_entry:
            continue
        out.append(m)
        out.extend(_walk_messages(m.nested_types))
    return out


def _all_messages() -> dict[str, descriptor.Descriptor]:
    found: dict[str, descriptor.Descriptor] = {}
    for module, _pkg in FILES.values():
        for m in _walk_messages(module.DESCRIPTOR.message_types_by_name.values()):
            found[m.full_name] = m
    return found


def _all_enums() -> dict[str, descriptor.EnumDescriptor]:
    found: dict[str, descriptor.EnumDescriptor] = {}
    for module, _pkg in FILES.values():
        for e in module.DESCRIPTOR.enum_types_by_name.values():
            found[e.full_name] = e
    for m in _all_messages().values():
        for e in m.enum_types:
            found[e.full_name] = e
    return found


def _is_proto3_optional(field: descriptor.FieldDescriptor) -> bool:
    proto = descriptor_pb2.FileDescriptorProto()
    field.file.CopyToProto(proto)
    path = field.containing_type.full_name[len(proto.package) + 1 :].split(".")
    msgs = proto.message_type
    msg = None
    for part in path:
        msg = next(m for m in msgs if m.name == part)
        msgs = msg.nested_type
    assert msg is not None
    fp = next(f for f in msg.field if f.name == field.name)
    return fp.proto3_optional


def _type_name(field: descriptor.FieldDescriptor) -> str:
    if field.type == _FD.TYPE_MESSAGE:
        return field.message_type.full_name
    if field.type == _FD.TYPE_ENUM:
        return field.enum_type.full_name
    for name, code in _SCALARS.items():
        if code == field.type:
            return name
    raise AssertionError(f"unexpected field type {field.type} for {field.full_name}")


def _describe(field: descriptor.FieldDescriptor) -> str:
    """Render a field descriptor in the table's notation."""
    if field.type == _FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        assert field.is_repeated
        entry = field.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        assert (key.number, value.number) == (1, 2)
        return f"map<{_type_name(key)}, {_type_name(value)}>"
    base = _type_name(field)
    if field.is_repeated:
        return "repeated " + base
    if _is_proto3_optional(field):
        return "optional " + base
    return base


def _expected_kind(type_spec: str) -> int | None:
    """The descriptor type implied by a table entry (None for maps)."""
    if type_spec.startswith("map<"):
        return None
    base = type_spec.split()[-1]
    if base in _SCALARS:
        return _SCALARS[base]
    if base in ENUMS:
        return _FD.TYPE_ENUM
    assert "." in base, f"table type {base!r} is neither scalar, enum nor qualified message"
    return _FD.TYPE_MESSAGE


# --------------------------------------------------------------------------
# (1) Schema table vs. generated descriptors
# --------------------------------------------------------------------------
@pytest.mark.parametrize(("filename", "entry"), sorted(FILES.items()))
def test_file_names_and_packages(filename, entry):
    module, package = entry
    assert module.DESCRIPTOR.name == filename
    assert module.DESCRIPTOR.package == package
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    assert proto.syntax == "proto3"


def test_message_set_is_exact():
    assert set(_all_messages()) == set(MESSAGES)


def test_enum_set_is_exact():
    assert set(_all_enums()) == set(ENUMS)


@pytest.mark.parametrize("message_name", sorted(MESSAGES))
def test_message_fields(message_name):
    msg = _all_messages()[message_name]
    expected = MESSAGES[message_name]

    actual = {f.name: (f.number, _describe(f)) for f in msg.fields}
    assert actual == expected

    for field in msg.fields:
        kind = _expected_kind(expected[field.name][1])
        if kind is not None:
            assert field.type == kind, field.full_name
        # proto3 implicit presence for plain scalars/enums; explicit only where declared.
        in_real_oneof = field.name in set().union(*ONEOFS.get(message_name, {}).values())
        if field.type != _FD.TYPE_MESSAGE and not field.is_repeated and not in_real_oneof:
            declared_optional = expected[field.name][1].startswith("optional ")
            assert field.has_presence == declared_optional, field.full_name

    real_oneofs = {
        o.name: {f.name for f in o.fields}
        for o in msg.oneofs
        if not (len(o.fields) == 1 and _is_proto3_optional(o.fields[0]))
    }
    assert real_oneofs == ONEOFS.get(message_name, {})


@pytest.mark.parametrize("message_name", sorted(MESSAGES))
def test_reserved(message_name):
    msg = _all_messages()[message_name]
    proto = descriptor_pb2.DescriptorProto()
    msg.CopyToProto(proto)
    numbers = {n for r in proto.reserved_range for n in range(r.start, r.end)}
    names = set(proto.reserved_name)
    assert (numbers, names) == RESERVED.get(message_name, (set(), set()))


@pytest.mark.parametrize("enum_name", sorted(ENUMS))
def test_enum_values(enum_name):
    enum = _all_enums()[enum_name]
    assert {v.name: v.number for v in enum.values} == ENUMS[enum_name]


def test_ca_service_method():
    service = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    assert [m.name for m in service.methods] == ["CreateCertificate"]
    method = service.methods_by_name["CreateCertificate"]
    assert f"/{service.full_name}/{method.name}" == CREATE_CERTIFICATE
    assert method.input_type.full_name == "istio.v1.auth.IstioCertificateRequest"
    assert method.output_type.full_name == "istio.v1.auth.IstioCertificateResponse"
    assert not method.client_streaming
    assert not method.server_streaming


def test_ca_stub_uses_full_method_path():
    class RecordingChannel:
        def __init__(self):
            self.paths = []

        def unary_unary(self, path, **_kwargs):
            self.paths.append(path)
            return object()

    channel = RecordingChannel()
    ca_pb2_grpc.IstioCertificateServiceStub(channel)
    assert channel.paths == [CREATE_CERTIFICATE]


# --------------------------------------------------------------------------
# (2) Generated code is fresh
# --------------------------------------------------------------------------
def test_generated_code_is_fresh(tmp_path):
    # Run from an unrelated cwd to prove gen.py does not depend on it.
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "protos" / "gen.py"), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# (3) Wire numbering, byte for byte
# --------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _top_level_fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    """Minimal wire decoder: [(field number, wire type, payload)]."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            out.append((number, wire_type, value))
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            out.append((number, wire_type, buf[pos : pos + length]))
            pos += length
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
    return out


def _ld(number: int, payload: bytes) -> bytes:
    """Hand-encode a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_tag_bytes_are_what_the_reference_says():
    # Spot-check the hand encoder against the example in the brief.
    assert _varint(20 << 3 | 2) == b"\xa2\x01"  # Workload.uid
    assert _varint(27 << 3 | 2) == b"\xda\x01"  # Workload.capacity


def test_address_workload_round_trip():
    wl = workload_pb2.Workload(
        uid="Kubernetes//Pod/default/app-1",
        name="app-1",
        namespace="default",
        addresses=[bytes([10, 0, 0, 7])],
        tunnel_protocol=workload_pb2.HBONE,
        hostname="app-1.example",
        capacity=UInt32Value(value=3),
    )
    wl.services["default/app.default.svc.cluster.local"].ports.add(service_port=80, target_port=8080)
    addr = workload_pb2.Address(workload=wl)
    data = addr.SerializeToString()

    # Address.workload is field 1, length-delimited -> tag 0x0a.
    top = _top_level_fields(data)
    assert [(n, t) for n, t, _ in top] == [(1, 2)]
    assert data[:1] == b"\x0a"
    body = top[0][2]
    assert isinstance(body, bytes)

    # Specific field encodings inside the Workload.
    assert b"\xa2\x01" + _varint(len(wl.uid)) + wl.uid.encode() in body  # uid = 20
    assert b"\xaa\x01\x0dapp-1.example" in body  # hostname = 21
    assert b"\x1a\x04\x0a\x00\x00\x07" in body  # addresses = 3 (bytes)
    assert b"\x28\x01" in body  # tunnel_protocol = 5, HBONE = 1
    assert b"\xda\x01\x02\x08\x03" in body  # capacity = 27, UInt32Value{value: 3}

    fields = {n: v for n, _t, v in _top_level_fields(body)}
    assert set(fields) == {1, 2, 3, 5, 20, 21, 22, 27}
    # services = 22 map entry: key (1) + PortList (2) -> Port{service_port 1, target_port 2}.
    entry = fields[22]
    assert isinstance(entry, bytes)
    assert entry == _ld(1, b"default/app.default.svc.cluster.local") + _ld(2, _ld(1, b"\x08\x50\x10\x90\x3f"))

    assert workload_pb2.Address.FromString(data) == addr


def test_hand_encoded_bytes_parse():
    # Build wire bytes by hand from reference numbers, then decode them.
    service = (
        _ld(1, b"svc")
        + _ld(3, b"svc.ns.svc.cluster.local")
        + _ld(4, _ld(2, bytes([10, 96, 0, 1])) + b"\x18\x00")  # NetworkAddress, length=0 present
        + b"\x58\x01"  # canonical = 11 (varint)
        + b"\x60\x01"  # ingress_use_waypoint = 12
        + _ld(13, _ld(1, b"\x18\x8f\x76") + b"\x10\x32")  # WeightedWaypoint{GatewayAddress{port}, weight 50}
        + b"\x70\x01"  # visibility = 14, NAMESPACE
    )
    addr = workload_pb2.Address.FromString(_ld(2, service))
    assert addr.WhichOneof("type") == "service"
    svc = addr.service
    assert svc.name == "svc"
    assert svc.hostname == "svc.ns.svc.cluster.local"
    assert svc.addresses[0].address == bytes([10, 96, 0, 1])
    assert svc.addresses[0].HasField("length")
    assert svc.addresses[0].length == 0
    assert svc.canonical
    assert svc.ingress_use_waypoint
    assert svc.weighted_waypoints[0].destination.hbone_mtls_port == 15119
    assert svc.weighted_waypoints[0].weight == 50
    assert svc.visibility == workload_pb2.Service.NAMESPACE
    assert len(unknown_fields.UnknownFieldSet(svc)) == 0
    assert len(unknown_fields.UnknownFieldSet(svc.addresses[0])) == 0


def test_authorization_wire():
    authz = authorization_pb2.Authorization(
        name="deny-all",
        namespace="istio-system",
        scope=authorization_pb2.WORKLOAD_SELECTOR,
        action=authorization_pb2.DENY,
        dry_run=True,
    )
    match = authz.groups.add().rules.add().matches.add()
    match.not_principals.add().presence.SetInParent()
    match.destination_ports.extend([80, 443])
    match.service_accounts.add(namespace="ns", serviceAccount="sa")
    data = authz.SerializeToString()

    fields = _top_level_fields(data)
    assert [(n, t) for n, t, _ in fields] == [(1, 2), (2, 2), (3, 0), (4, 0), (5, 2), (6, 0)]
    assert b"\x18\x02" in data  # scope = 3, WORKLOAD_SELECTOR
    assert b"\x20\x01" in data  # action = 4, DENY
    assert b"\x30\x01" in data  # dry_run = 6

    group = fields[4][2]
    assert isinstance(group, bytes)
    expected_match = (
        _ld(4, b"\x22\x00")  # not_principals -> StringMatch{presence (4): Empty}
        + b"\x4a\x03\x50\xbb\x03"  # destination_ports = 9, packed [80, 443]
        + _ld(11, _ld(1, b"ns") + _ld(2, b"sa"))  # service_accounts = 11
    )
    # Group.rules (1) -> Rules.matches (2) -> Match.
    assert group == _ld(1, _ld(2, expected_match))
    assert authorization_pb2.Authorization.FromString(data) == authz
