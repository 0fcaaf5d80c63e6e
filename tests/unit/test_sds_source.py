"""SDS names, node identities and the Envoy Secret translation (pure parts of sds/agent/sds_source.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import struct_pb2

from sds.agent.sds_source import (
    default_resource,
    file_resource,
    node_identity,
    parse_name,
    rootca_resource,
)
from ztcore.identity import Identity
from ztcore.identity.manager import WorkloadCert
from ztcore.xds import typeurls

DEFAULT_ID = Identity("cluster.local", "istio-system", "ztunnel")


@pytest.mark.parametrize(
    ("name", "kind", "paths"),
    [
        ("default", "default", ()),
        ("ROOTCA", "rootca", ()),
        (
            "file-cert:/etc/certs/cert-chain.pem~/etc/certs/key.pem",
            "file-cert",
            ("/etc/certs/cert-chain.pem", "/etc/certs/key.pem"),
        ),
        ("file-root:/etc/certs/root-cert.pem", "file-root", ("/etc/certs/root-cert.pem",)),
    ],
)
def test_parse_name(name: str, kind: str, paths: tuple[str, ...]) -> None:
    parsed = parse_name(name)
    assert parsed.kind == kind and parsed.paths == tuple(Path(p) for p in paths)


def test_file_root_system_is_the_os_bundle() -> None:
    parsed = parse_name("file-root:system")
    assert parsed.kind == "file-root" and parsed.paths[0].name.endswith((".crt", ".pem"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("file-cert:/only/cert.pem", "file-cert:<cert-path>~<key-path>"),
        ("file-cert:~/key.pem", "file-cert:<cert-path>~<key-path>"),
        ("file-root:", "file-root:<ca-path>"),
        ("kubernetes://my-secret", "unknown SDS resource"),
        ("Default", "unknown SDS resource"),
    ],
)
def test_parse_name_rejects_what_it_cannot_serve(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_name(name)


def _node(**meta: str) -> base_pb2.Node:
    node = base_pb2.Node(id="sidecar~10.0.0.1~p.shop~shop.svc.cluster.local")
    node.metadata.CopyFrom(struct_pb2.Struct())
    node.metadata.update(meta)
    return node


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({}, DEFAULT_ID),
        ({"NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart"}, Identity("cluster.local", "shop", "cart")),
        (
            {"NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart", "CLUSTER_ID": "Kubernetes"},
            Identity("cluster.local", "shop", "cart"),
        ),
    ],
)
def test_node_identity(meta: dict[str, str], expected: Identity) -> None:
    assert node_identity(_node(**meta), "cluster.local", DEFAULT_ID) == expected


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"NAMESPACE": "shop"}, "only one of NAMESPACE and SERVICE_ACCOUNT"),
        ({"NAMESPACE": "shop", "SERVICE_ACCOUNT": "a/b"}, "invalid identity"),
    ],
)
def test_node_identity_errors(meta: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        node_identity(_node(**meta), "cluster.local", DEFAULT_ID)


def _unpack(res) -> secret_pb2.Secret:
    assert res.type_url == typeurls.SECRET
    out = secret_pb2.Secret()
    res.any.Unpack(out)
    return out


def test_default_and_rootca_secrets_are_istio_shaped() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = WorkloadCert(DEFAULT_ID, b"CHAIN", b"KEY", b"ROOTS", 1, now, now, now)
    default = _unpack(default_resource(cert))
    assert default.name == "default"
    assert default.tls_certificate.certificate_chain.inline_bytes == b"CHAIN"
    assert default.tls_certificate.private_key.inline_bytes == b"KEY"
    root = _unpack(rootca_resource(b"ROOTS"))
    assert root.name == "ROOTCA" and root.validation_context.trusted_ca.inline_bytes == b"ROOTS"
    assert rootca_resource(b"ROOTS").version == rootca_resource(b"ROOTS").version != rootca_resource(b"R2").version
    assert "KEY" not in repr(cert), "keys never show up in reprs or logs"


def test_file_resources_wait_for_every_file() -> None:
    cert_name = parse_name("file-cert:/c.pem~/k.pem")
    assert file_resource(cert_name, {Path("/c.pem"): b"C", Path("/k.pem"): None}) is None
    assert file_resource(cert_name, {Path("/c.pem"): b"C", Path("/k.pem"): b"  \n"}) is None
    got = _unpack(file_resource(cert_name, {Path("/c.pem"): b"C", Path("/k.pem"): b"K"}))
    assert got.name == cert_name.name and got.tls_certificate.private_key.inline_bytes == b"K"
    root_name = parse_name("file-root:/r.pem")
    assert _unpack(file_resource(root_name, {Path("/r.pem"): b"R"})).validation_context.trusted_ca.inline_bytes == b"R"
