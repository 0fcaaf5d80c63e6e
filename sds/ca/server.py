"""istio.v1.auth.IstioCertificateService/CreateCertificate: authenticate → authorize → sign.

Client-visible errors follow istiod: every authentication or impersonation failure is the same opaque
Unauthenticated; CSR and TTL problems are InvalidArgument ("CSR signing error (...)"); CA trouble is
Internal. The detailed reason is logged with the peer address, never with the token or any key.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import struct_pb2

from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from sds.ca import signer
from sds.ca.keyring import CAMaterial
from sds.ca.nodeauthz import ImpersonationDenied, NodeAuthorizer
from ztcore.authn import AuthenticationError, Authenticator, PeerLookup, authenticate, credentials_from_context
from ztcore.metrics import Registry

log = logging.getLogger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
CERT_SIGNER = "CertSigner"
AUTHN_FAILURE = "request authenticate failure"
IMPERSONATION_FAILURE = "request impersonation authentication failure"


class CAMetrics:
    """istiod's citadel_server_* series (security/pkg/server/ca/monitoring.go)."""

    def __init__(self, registry: Registry, material: Callable[[], CAMaterial], clock: Callable[[], dt.datetime]):
        self.csr_count = registry.counter("citadel_server_csr_count", "The number of CSRs received by Citadel server.")
        self.authn_failure = registry.counter(
            "citadel_server_authentication_failure_count", "The number of authentication failures."
        )
        self.csr_parsing_err = registry.counter(
            "citadel_server_csr_parsing_err_count", "The number of errors occurred when parsing the CSR."
        )
        self.id_extraction_err = registry.counter(
            "citadel_server_id_extraction_err_count", "The number of errors occurred when extracting the ID from CSR."
        )
        self.csr_sign_err = registry.counter(
            "citadel_server_csr_sign_err_count", "The number of errors occurred when signing the CSR."
        )
        self.success = registry.counter(
            "citadel_server_success_cert_issuance_count", "The number of certificates issuances that have succeeded."
        )
        registry.function_gauge(
            "citadel_server_root_cert_expiry_timestamp",
            "The unix timestamp, in seconds, when the root cert will expire.",
            lambda: material().root_not_after.timestamp(),
        )
        registry.function_gauge(
            "citadel_server_root_cert_expiry_seconds",
            "The time remaining, in seconds, before the root cert will expire.",
            lambda: (material().root_not_after - clock()).total_seconds(),
        )
        registry.function_gauge(
            "citadel_server_cert_chain_expiry_timestamp",
            "The unix timestamp, in seconds, when the cert chain will expire.",
            lambda: material().not_after.timestamp(),
        )
        registry.function_gauge(
            "citadel_server_cert_chain_expiry_seconds",
            "The time remaining, in seconds, before the cert chain will expire.",
            lambda: (material().not_after - clock()).total_seconds(),
        )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _deny(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort returned")  # grpc's abort always raises


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(
        self,
        *,
        material: Callable[[], CAMaterial],
        authenticators: Sequence[Authenticator],
        node_authorizer: NodeAuthorizer | None,
        policy: signer.SignPolicy,
        metrics: CAMetrics,
        tls_peers: PeerLookup | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        """`tls_peers` is the TLS front's lookup on the secure port; None on a plaintext port."""
        self._material = material
        self._authenticators = list(authenticators)
        self._node_authorizer = node_authorizer
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._tls_peers = tls_peers

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            return await self._create(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # A bug must not leak a traceback or exception text to the caller; the log has it.
            log.exception("CA request from %s failed unexpectedly", self._peer(context))
            self._metrics.csr_sign_err.inc()
            await _deny(context, grpc.StatusCode.INTERNAL, "internal error")

    def _peer(self, context: grpc.aio.ServicerContext) -> str:
        """The client's address: on the secure port the one the TLS front saw, not the front's relay."""
        relayed = context.peer() or "unknown"
        tls = self._tls_peers(relayed) if self._tls_peers is not None else None
        return tls.address if tls is not None else relayed

    async def _create(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        self._metrics.csr_count.inc()
        creds = credentials_from_context(context, self._tls_peers)
        if creds is None:
            self._metrics.authn_failure.inc()
            log.warning("CA request from %s refused: it did not arrive through the TLS port", context.peer())
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED, AUTHN_FAILURE)
        try:
            caller = await authenticate(self._authenticators, creds)
        except AuthenticationError as err:
            self._metrics.authn_failure.inc()
            log.warning("CA request from %s refused: authentication failed: %s", creds.peer, err)
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED, AUTHN_FAILURE)
        sans = list(caller.identities)
        requested = _impersonated_identity(request.metadata)
        if requested is not None:
            if self._node_authorizer is None:
                self._metrics.authn_failure.inc()
                log.warning(
                    "CA request from %s (%s) refused: impersonation requested but no trusted node accounts "
                    "are configured",
                    creds.peer,
                    sans[0],
                )
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED, IMPERSONATION_FAILURE)
            try:
                wanted = self._node_authorizer.authorize(caller, requested)
            except ImpersonationDenied as err:
                self._metrics.authn_failure.inc()
                log.warning(
                    "CA request from %s (%s) to impersonate %r refused: %s", creds.peer, sans[0], requested[:256], err
                )
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED, IMPERSONATION_FAILURE)
            sans = [wanted.uri]
        try:
            ttl = signer.resolve_ttl(request.validity_duration, self._policy)
            public_key = signer.parse_csr(request.csr)
        except signer.SignError as err:
            self._metrics.csr_parsing_err.inc()
            log.info("CA request from %s (%s) rejected: %s", creds.peer, sans[0], err)
            await _deny(context, grpc.StatusCode.INVALID_ARGUMENT, f"CSR signing error ({err})")
        material = self._material()
        try:
            chain = signer.sign(public_key, sans, ttl, material, self._clock())
        except signer.CANotReady as err:
            self._metrics.csr_sign_err.inc()
            log.error("CA cannot sign: %s", err)
            await _deny(context, grpc.StatusCode.INTERNAL, f"CSR signing error ({err})")
        except signer.SignError as err:
            self._metrics.csr_sign_err.inc()
            await _deny(context, grpc.StatusCode.INVALID_ARGUMENT, f"CSR signing error ({err})")
        self._metrics.success.inc()
        log.debug("issued certificate for %s to %s (%s)", sans[0], creds.peer, caller.authenticator)
        # Leaf first, one PEM per element, then the whole root bundle as the last element.
        return ca_pb2.IstioCertificateResponse(cert_chain=[*chain, material.root_bundle_pem])


def _impersonated_identity(metadata: struct_pb2.Struct) -> str | None:
    """The requested identity, or None when absent or empty (as istiod).

    A present non-string value is returned as a placeholder that no authorizer accepts: istiod would
    silently ignore it and sign the caller's own identity, which hides a broken client.
    """
    if IMPERSONATED_IDENTITY not in metadata.fields:
        return None
    value = metadata.fields[IMPERSONATED_IDENTITY]
    if value.WhichOneof("kind") != "string_value":
        return f"<non-string {value.WhichOneof('kind')}>"
    return value.string_value or None
