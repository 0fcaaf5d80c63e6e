"""SPIFFE identities as Istio writes them: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

from dataclasses import dataclass

SPIFFE_PREFIX = "spiffe://"


class IdentityError(ValueError):
    """A string that is not an Istio SPIFFE identity."""


@dataclass(frozen=True, slots=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        for part, value in (
            ("trust domain", self.trust_domain),
            ("namespace", self.namespace),
            ("service account", self.service_account),
        ):
            if not value or "/" in value:
                raise IdentityError(f"invalid {part} {value!r}")

    @classmethod
    def parse(cls, uri: str) -> Identity:
        # Same rule as istio pkg/spiffe ParseIdentity: exactly td/ns/<ns>/sa/<sa>.
        if not uri.startswith(SPIFFE_PREFIX):
            raise IdentityError(f"identity is not a spiffe:// URI: {uri!r}")
        parts = uri[len(SPIFFE_PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(f"identity is not spiffe://<td>/ns/<ns>/sa/<sa>: {uri!r}")
        return cls(parts[0], parts[2], parts[4])

    @classmethod
    def for_account(cls, trust_domain: str, namespace: str, service_account: str) -> Identity:
        # Istio replaces "@" in a trust domain with "." when it builds a SPIFFE URI.
        return cls(trust_domain.replace("@", "."), namespace, service_account)

    @property
    def uri(self) -> str:
        return f"{SPIFFE_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy principals use: the URI without spiffe://."""
        return self.uri[len(SPIFFE_PREFIX) :]

    def __str__(self) -> str:
        return self.uri
