"""L4 authorization as ztunnel receives it (`istio.security.Authorization`).

Structure, outermost first: a policy matches if any `Group` matches; a group matches if every `Rules` entry
matches (a group with no entries matches everything); a `Rules` entry matches if any of its non-empty
`Match`es matches; a `Match` matches if every non-empty field is satisfied. ztunnel calls Group "Rule" and
Rules "Clause"; the names here follow the wire (Istio's pkg/workloadapi/security/authorization.proto).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TypeAlias

from google.protobuf import empty_pb2

from protos.istio.security import authorization_pb2 as pb

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class Scope(enum.IntEnum):
    """Which workloads a policy applies to; values are the proto's."""

    GLOBAL = 0
    NAMESPACE = 1
    WORKLOAD_SELECTOR = 2


class Action(enum.IntEnum):
    ALLOW = 0
    DENY = 1


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(MatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(MatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(MatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(MatchKind.PRESENCE)

    @classmethod
    def from_istio(cls, pattern: str) -> StringMatch:
        """AuthorizationPolicy string syntax: "*" any non-empty value, "*x" suffix, "x*" prefix, else exact.

        The leading-star test comes first, as in Istio, so "*x*" is a suffix match on "x*".
        """
        if pattern == "*":
            return cls.presence()
        if pattern.startswith("*"):
            return cls.suffix(pattern[1:])
        if pattern.endswith("*"):
            return cls.prefix(pattern[:-1])
        return cls.exact(pattern)

    def matches(self, value: str) -> bool:
        match self.kind:
            case MatchKind.EXACT:
                return value == self.value
            case MatchKind.PREFIX:
                return value.startswith(self.value)
            case MatchKind.SUFFIX:
                return value.endswith(self.value)
            case MatchKind.PRESENCE:
                return value != ""

    def to_pb(self) -> pb.StringMatch:
        match self.kind:
            case MatchKind.EXACT:
                return pb.StringMatch(exact=self.value)
            case MatchKind.PREFIX:
                return pb.StringMatch(prefix=self.value)
            case MatchKind.SUFFIX:
                return pb.StringMatch(suffix=self.value)
            case MatchKind.PRESENCE:
                return pb.StringMatch(presence=empty_pb2.Empty())

    @classmethod
    def from_pb(cls, msg: pb.StringMatch) -> StringMatch | None:
        """None for a StringMatch with no match type set (ztunnel drops those)."""
        which = msg.WhichOneof("match_type")
        if which is None:
            return None
        if which == "presence":
            return cls.presence()
        return cls(MatchKind(which), str(getattr(msg, which)))


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str

    def to_pb(self) -> pb.ServiceAccountMatch:
        return pb.ServiceAccountMatch(namespace=self.namespace, serviceAccount=self.service_account)

    @classmethod
    def from_pb(cls, msg: pb.ServiceAccountMatch) -> ServiceAccountMatch:
        return cls(msg.namespace, msg.serviceAccount)


@dataclass(frozen=True, slots=True)
class Cidr:
    """An address and prefix length, kept as written: Istio sends "10.1.2.3/24" without masking it."""

    address: IPAddress
    length: int

    def __post_init__(self) -> None:
        if not 0 <= self.length <= self.address.max_prefixlen:
            raise ValueError(f"prefix length {self.length} is out of range for {self.address}")

    @classmethod
    def parse(cls, text: str) -> Cidr:
        """A bare address (a /32 or /128) or address/length; ValueError for anything else."""
        if "/" in text:
            iface = ipaddress.ip_interface(text)
            return cls(iface.ip, iface.network.prefixlen)
        addr = ipaddress.ip_address(text)
        return cls(addr, addr.max_prefixlen)

    def contains(self, ip: IPAddress) -> bool:
        if ip.version != self.address.version:
            return False
        network = ipaddress.ip_network((self.address, self.length), strict=False)
        return ip in network

    def __str__(self) -> str:
        return f"{self.address}/{self.length}"

    def to_pb(self) -> pb.Address:
        return pb.Address(address=self.address.packed, length=self.length)

    @classmethod
    def from_pb(cls, msg: pb.Address) -> Cidr | None:
        """None for a malformed address or length (ztunnel drops those rather than rejecting the policy)."""
        try:
            return cls(ipaddress.ip_address(msg.address), msg.length)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Match:
    """One set of conditions. Within a field the values are alternatives; non-empty fields are all required."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[Cidr, ...] = ()
    not_source_ips: tuple[Cidr, ...] = ()
    destination_ips: tuple[Cidr, ...] = ()
    not_destination_ips: tuple[Cidr, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        """An empty Match is skipped by ztunnel: it matches nothing, not everything."""
        return not any(getattr(self, f.name) for f in fields(self))

    def to_pb(self) -> pb.Match:
        return pb.Match(
            namespaces=[m.to_pb() for m in self.namespaces],
            not_namespaces=[m.to_pb() for m in self.not_namespaces],
            service_accounts=[m.to_pb() for m in self.service_accounts],
            not_service_accounts=[m.to_pb() for m in self.not_service_accounts],
            principals=[m.to_pb() for m in self.principals],
            not_principals=[m.to_pb() for m in self.not_principals],
            source_ips=[c.to_pb() for c in self.source_ips],
            not_source_ips=[c.to_pb() for c in self.not_source_ips],
            destination_ips=[c.to_pb() for c in self.destination_ips],
            not_destination_ips=[c.to_pb() for c in self.not_destination_ips],
            destination_ports=list(self.destination_ports),
            not_destination_ports=list(self.not_destination_ports),
        )

    @classmethod
    def from_pb(cls, msg: pb.Match) -> Match:
        def strings(items: Iterable[pb.StringMatch]) -> tuple[StringMatch, ...]:
            converted = (StringMatch.from_pb(m) for m in items)
            return tuple(m for m in converted if m is not None)

        def cidrs(items: Iterable[pb.Address]) -> tuple[Cidr, ...]:
            converted = (Cidr.from_pb(a) for a in items)
            return tuple(c for c in converted if c is not None)

        return cls(
            namespaces=strings(msg.namespaces),
            not_namespaces=strings(msg.not_namespaces),
            service_accounts=tuple(ServiceAccountMatch.from_pb(m) for m in msg.service_accounts),
            not_service_accounts=tuple(ServiceAccountMatch.from_pb(m) for m in msg.not_service_accounts),
            principals=strings(msg.principals),
            not_principals=strings(msg.not_principals),
            source_ips=cidrs(msg.source_ips),
            not_source_ips=cidrs(msg.not_source_ips),
            destination_ips=cidrs(msg.destination_ips),
            not_destination_ips=cidrs(msg.not_destination_ips),
            # ztunnel keeps ports as u16; larger values cannot match any connection anyway.
            destination_ports=tuple(int(p) for p in msg.destination_ports),
            not_destination_ports=tuple(int(p) for p in msg.not_destination_ports),
        )


@dataclass(frozen=True, slots=True)
class Rules:
    """Alternatives: satisfied if any non-empty Match is (ztunnel: Clause)."""

    matches: tuple[Match, ...] = ()

    def to_pb(self) -> pb.Rules:
        return pb.Rules(matches=[m.to_pb() for m in self.matches])

    @classmethod
    def from_pb(cls, msg: pb.Rules) -> Rules:
        return cls(tuple(Match.from_pb(m) for m in msg.matches))


@dataclass(frozen=True, slots=True)
class Group:
    """A conjunction: every Rules entry must be satisfied; no entries means match-all (ztunnel: Rule)."""

    rules: tuple[Rules, ...] = ()

    def to_pb(self) -> pb.Group:
        return pb.Group(rules=[r.to_pb() for r in self.rules])

    @classmethod
    def from_pb(cls, msg: pb.Group) -> Group:
        return cls(tuple(Rules.from_pb(r) for r in msg.rules))


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    scope: Scope
    action: Action
    # No groups: the policy never matches (an ALLOW policy that allows nothing).
    groups: tuple[Group, ...] = field(default=())
    dry_run: bool = False

    @property
    def key(self) -> str:
        """The xDS resource name and the form workloads reference policies by: "<namespace>/<name>"."""
        return f"{self.namespace}/{self.name}"

    def to_pb(self) -> pb.Authorization:
        return pb.Authorization(
            name=self.name,
            namespace=self.namespace,
            scope=pb.Scope.Value(self.scope.name),
            action=pb.Action.Value(self.action.name),
            groups=[g.to_pb() for g in self.groups],
            dry_run=self.dry_run,
        )

    @classmethod
    def from_pb(cls, msg: pb.Authorization) -> Authorization:
        """ValueError for an unknown scope or action (a newer control plane), as ztunnel rejects those."""
        return cls(
            name=msg.name,
            namespace=msg.namespace,
            scope=Scope(msg.scope),
            action=Action(msg.action),
            groups=tuple(Group.from_pb(g) for g in msg.groups),
            dry_run=msg.dry_run,
        )
