"""The SDS source: secrets → Envoy `Secret` resources in the cache, and per-stream bindings.

Names served (istio pkg/security SdsCertificateConfig):
- `default`: the workload key and chain of the stream's identity (per-identity cache scope);
- `ROOTCA`: the trust bundle (shared scope);
- `file-cert:<cert>~<key>` and `file-root:<ca>`: read from the named files, pushed again when they change
  (`file-root:system` is the OS bundle).
The stream's identity comes from the Envoy node metadata NAMESPACE and SERVICE_ACCOUNT (as Istio's
bootstrap sets them); without them it is the agent's default identity.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from ztcore.filewatch import Contents, FileWatcher
from ztcore.identity import Identity, IdentityError
from ztcore.identity.manager import SecretEvent, SecretManager, WorkloadCert
from ztcore.xds import typeurls
from ztcore.xds.cache import GLOBAL_SCOPE, SnapshotCache
from ztcore.xds.grpc_adapter import SourceError
from ztcore.xds.resources import Resource

log = logging.getLogger(__name__)

DEFAULT = "default"
ROOTCA = "ROOTCA"
FILE_CERT_PREFIX = "file-cert:"
FILE_ROOT_PREFIX = "file-root:"
FILE_SEPARATOR = "~"
SYSTEM_ROOTS = "system"


# -- pure translation --------------------------------------------------------------------------------


def tls_certificate_secret(name: str, chain_pem: bytes, key_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=key_pem),
        ),
    )


def validation_secret(name: str, roots_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=roots_pem)
        ),
    )


def default_resource(cert: WorkloadCert) -> Resource:
    return Resource.pack(DEFAULT, tls_certificate_secret(DEFAULT, cert.chain_pem, cert.key_pem))


def rootca_resource(roots_pem: bytes) -> Resource:
    return Resource.pack(ROOTCA, validation_secret(ROOTCA, roots_pem))


@dataclass(frozen=True, slots=True)
class SecretName:
    name: str
    kind: str  # "default", "rootca", "file-cert" or "file-root"
    paths: tuple[Path, ...] = ()


def parse_name(name: str) -> SecretName:
    """Classify an SDS resource name; ValueError with a readable reason for anything else."""
    if name == DEFAULT:
        return SecretName(name, "default")
    if name == ROOTCA:
        return SecretName(name, "rootca")
    if name.startswith(FILE_CERT_PREFIX):
        cert, sep, key = name[len(FILE_CERT_PREFIX) :].partition(FILE_SEPARATOR)
        if not sep or not cert or not key:
            raise ValueError(f"SDS name {name!r} is not file-cert:<cert-path>~<key-path>")
        return SecretName(name, "file-cert", (Path(cert), Path(key)))
    if name.startswith(FILE_ROOT_PREFIX):
        ca = name[len(FILE_ROOT_PREFIX) :]
        if not ca:
            raise ValueError(f"SDS name {name!r} is not file-root:<ca-path>")
        if ca == SYSTEM_ROOTS:
            paths = ssl.get_default_verify_paths()
            ca = paths.cafile or paths.openssl_cafile
        return SecretName(name, "file-root", (Path(ca),))
    raise ValueError(
        f"unknown SDS resource {name!r} (this agent serves default, ROOTCA, file-cert:<cert>~<key>, file-root:<ca>)"
    )


def file_resource(parsed: SecretName, contents: Contents) -> Resource | None:
    """The secret built from the files' bytes, or None while any of them is missing or empty."""
    data = [contents.get(p) for p in parsed.paths]
    if any(not d or not d.strip() for d in data):
        return None
    if parsed.kind == "file-cert":
        return Resource.pack(parsed.name, tls_certificate_secret(parsed.name, data[0] or b"", data[1] or b""))
    return Resource.pack(parsed.name, validation_secret(parsed.name, data[0] or b""))


def node_identity(node: base_pb2.Node, trust_domain: str, default: Identity) -> Identity:
    """The identity a stream serves: node metadata NAMESPACE + SERVICE_ACCOUNT, else the agent's default."""
    fields = node.metadata.fields
    ns = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
    sa = fields["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in fields else ""
    if not ns and not sa:
        return default
    if not ns or not sa:
        raise ValueError("node metadata has only one of NAMESPACE and SERVICE_ACCOUNT; give both or neither")
    try:
        return Identity.for_account(trust_domain, ns, sa)
    except IdentityError as err:
        raise ValueError(f"node metadata names an invalid identity: {err}") from None


# -- the source ----------------------------------------------------------------------------------------


class SdsSource:
    def __init__(
        self,
        cache: SnapshotCache,
        secrets: SecretManager,
        files: FileWatcher,
        *,
        trust_domain: str,
        default_identity: Identity,
    ) -> None:
        self._cache = cache
        self._secrets = secrets
        self._files = files
        self.trust_domain = trust_domain
        self.default_identity = default_identity
        self._file_watches: dict[str, tuple[int, int]] = {}  # name -> (refs, watch handle)
        secrets.add_listener(self._on_secret)

    def _on_secret(self, event: SecretEvent) -> None:
        if event.kind == "cert" and event.cert is not None:
            self._cache.upsert(typeurls.SECRET, [default_resource(event.cert)], scope=event.cert.identity.uri)
        elif event.kind == "roots":
            self._cache.upsert(typeurls.SECRET, [rootca_resource(event.roots_pem)], scope=GLOBAL_SCOPE)
        elif event.kind == "dropped" and event.identity is not None:
            self._cache.drop_scope(event.identity.uri)

    async def open_stream(self, node: base_pb2.Node, peer: str) -> SdsBinding:
        try:
            identity = node_identity(node, self.trust_domain, self.default_identity)
        except ValueError as err:
            raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        return SdsBinding(self, identity)

    def acquire_file(self, parsed: SecretName) -> None:
        refs, handle = self._file_watches.get(parsed.name, (0, 0))
        if refs == 0:

            def changed(contents: Contents) -> None:
                res = file_resource(parsed, contents)
                if res is None:
                    missing = [str(p) for p in parsed.paths if not contents.get(p)]
                    log.warning("SDS %s: cannot serve, missing or empty: %s", parsed.name, ", ".join(missing))
                    self._cache.remove(typeurls.SECRET, [parsed.name])
                    return
                if self._cache.upsert(typeurls.SECRET, [res]):
                    log.info("SDS %s: loaded from files (version %s)", parsed.name, res.version)

            handle = self._files.watch(parsed.paths, changed)
        self._file_watches[parsed.name] = (refs + 1, handle)

    def release_file(self, name: str) -> None:
        refs, handle = self._file_watches.get(name, (0, 0))
        if refs <= 1:
            self._file_watches.pop(name, None)
            if handle:
                self._files.unwatch(handle)
                self._cache.remove(typeurls.SECRET, [name])
        else:
            self._file_watches[name] = (refs - 1, handle)

    def acquire_identity(self, identity: Identity) -> None:
        self._secrets.acquire(identity)

    def release_identity(self, identity: Identity) -> None:
        self._secrets.release(identity)


class SdsBinding:
    """One Envoy stream: its identity's scope, and the names it holds references to."""

    def __init__(self, source: SdsSource, identity: Identity) -> None:
        self._source = source
        self.identity = identity
        self._held: dict[str, SecretName] = {}

    @property
    def scopes(self) -> tuple[str, ...]:
        return (self.identity.uri, GLOBAL_SCOPE)

    async def subscribe(self, type_url: str, names: frozenset[str]) -> None:
        if type_url != typeurls.SECRET:
            raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, f"this agent serves only {typeurls.SECRET}")
        parsed: list[SecretName] = []
        for name in sorted(names):
            try:
                parsed.append(parse_name(name))
            except ValueError as err:
                raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        for item in parsed:
            if item.name in self._held:
                continue
            self._held[item.name] = item
            if item.kind == "default":
                self._source.acquire_identity(self.identity)
            elif item.kind.startswith("file-"):
                self._source.acquire_file(item)

    async def unsubscribe(self, type_url: str, names: frozenset[str]) -> None:
        for name in names:
            item = self._held.pop(name, None)
            if item is None:
                continue
            if item.kind == "default":
                self._source.release_identity(self.identity)
            elif item.kind.startswith("file-"):
                self._source.release_file(item.name)

    async def close(self) -> None:
        await self.unsubscribe(typeurls.SECRET, frozenset(self._held))
