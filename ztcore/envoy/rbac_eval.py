"""Evaluate generated RBAC filters for one request, the way Envoy's RBAC filters would (for `ztctl x authz check`).

Filters run in order. A filter's `rules` enforce: DENY denies when a policy matches; ALLOW denies when none
matches; LOG only records. `shadow_rules` never enforce (dry-run), and a filter without `rules` enforces nothing.
A policy matches when any permission and any principal match. Pure: protos in, a Decision out.

Only the matchers rbac.py emits are understood; anything else raises ValueError rather than guessing. Dynamic
metadata (jwt_authn payload, experimental.envoy.filters.*) is never present here, so metadata matchers never match.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import string_pb2


@dataclass(frozen=True, slots=True)
class Request:
    """A connection (method None) or an HTTP request to the sidecar's workload."""

    source_ip: str
    destination_ip: str
    destination_port: int
    source_principal: str | None = None  # the peer's URI SAN (spiffe://...); None for plaintext
    sni: str = ""
    method: str | None = None  # None: a plain TCP connection
    path: str = "/"
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    remote_ip: str | None = None  # the original client (XFF / PROXY protocol); None: the peer itself

    @property
    def is_http(self) -> bool:
        return self.method is not None

    def header(self, name: str) -> str | None:
        """Envoy's view: pseudo-headers from the request line, repeated headers joined with ','."""
        lname = name.lower()
        if lname == ":method":
            return self.method
        if lname in (":authority", "host"):
            return self.host or None
        if lname == ":path":
            return self.path
        values = [v for k, v in self.headers if k.lower() == lname]
        return ",".join(values) if values else None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None  # the Envoy policy name that decided (a DENY match), if any
    logged: tuple[str, ...] = ()  # AUDIT (LOG) policies that matched
    shadow: tuple[str, ...] = ()  # dry-run results: "<allow|deny> <policy or 'no match'>"


def _fold(text: str, ignore_case: bool) -> str:
    return text.lower() if ignore_case else text


def _string(m: string_pb2.StringMatcher, value: str | None) -> bool:
    if value is None:
        return False
    kind = m.WhichOneof("match_pattern")
    if kind == "safe_regex":
        return re.fullmatch(m.safe_regex.regex, value) is not None  # RE2 and Envoy: the whole value
    v = _fold(value, m.ignore_case)
    if kind == "exact":
        return v == _fold(m.exact, m.ignore_case)
    if kind == "prefix":
        return v.startswith(_fold(m.prefix, m.ignore_case))
    if kind == "suffix":
        return v.endswith(_fold(m.suffix, m.ignore_case))
    if kind == "contains":
        return _fold(m.contains, m.ignore_case) in v
    raise ValueError(f"unsupported string matcher {kind}")


def _header(m: route_components_pb2.HeaderMatcher, req: Request) -> bool:
    value = req.header(m.name)
    kind = m.WhichOneof("header_match_specifier")
    if kind == "present_match":
        result = (value is not None) == bool(m.present_match)
    elif value is None:
        result = False
    elif kind == "string_match":
        result = _string(m.string_match, value)
    elif kind == "safe_regex_match":
        result = re.fullmatch(m.safe_regex_match.regex, value) is not None
    else:
        raise ValueError(f"unsupported header matcher {kind}")
    return result != bool(m.invert_match)


def _in_cidr(cidr: address_pb2.CidrRange, ip: str) -> bool:
    net = ipaddress.ip_network(f"{cidr.address_prefix}/{cidr.prefix_len.value}", strict=False)
    addr = ipaddress.ip_address(ip)
    return addr.version == net.version and addr in net


def _permission(p: rbac_pb2.Permission, req: Request) -> bool:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return bool(p.any)
    if kind == "and_rules":
        return all(_permission(r, req) for r in p.and_rules.rules)
    if kind == "or_rules":
        return any(_permission(r, req) for r in p.or_rules.rules)
    if kind == "not_rule":
        return not _permission(p.not_rule, req)
    if kind == "destination_port":
        return bool(p.destination_port == req.destination_port)
    if kind == "destination_ip":
        return _in_cidr(p.destination_ip, req.destination_ip)
    if kind == "requested_server_name":
        return _string(p.requested_server_name, req.sni)
    if kind == "header":
        return req.is_http and _header(p.header, req)
    if kind == "url_path":
        # Envoy matches the path without its query string.
        return req.is_http and _string(p.url_path.path, req.path.split("?", 1)[0].split("#", 1)[0])
    if kind == "metadata":
        return bool(p.metadata.invert)  # no dynamic metadata here: the value never matches
    raise ValueError(f"unsupported permission {kind}")


def _principal(p: rbac_pb2.Principal, req: Request) -> bool:
    kind = p.WhichOneof("identifier")
    if kind == "any":
        return bool(p.any)
    if kind == "and_ids":
        return all(_principal(i, req) for i in p.and_ids.ids)
    if kind == "or_ids":
        return any(_principal(i, req) for i in p.or_ids.ids)
    if kind == "not_id":
        return not _principal(p.not_id, req)
    if kind == "authenticated":
        if req.source_principal is None:
            return False  # plaintext: no peer certificate
        if not p.authenticated.HasField("principal_name"):
            return True
        return _string(p.authenticated.principal_name, req.source_principal)
    if kind == "direct_remote_ip":
        return _in_cidr(p.direct_remote_ip, req.source_ip)
    if kind == "remote_ip":
        return _in_cidr(p.remote_ip, req.remote_ip or req.source_ip)
    if kind == "header":
        return req.is_http and _header(p.header, req)
    if kind == "metadata":
        return bool(p.metadata.invert)
    raise ValueError(f"unsupported principal {kind}")


def _matching(rules: rbac_pb2.RBAC, req: Request) -> str | None:
    """The first matching policy, by name (Envoy's map order is unspecified; sorted keeps this deterministic)."""
    for name in sorted(rules.policies):
        pol = rules.policies[name]
        if any(_permission(p, req) for p in pol.permissions) and any(_principal(i, req) for i in pol.principals):
            return str(name)
    return None


def _evaluate(configs: Sequence[_Pair], req: Request) -> Decision:
    logged: list[str] = []
    shadow: list[str] = []
    for i, (rules, shadow_rules) in enumerate(configs):
        if shadow_rules is not None:
            hit = _matching(shadow_rules, req)
            action = rbac_pb2.RBAC.Action.Name(shadow_rules.action).lower()
            shadow.append(f"{action} {hit or 'no match'}")
        if rules is None:
            continue
        hit = _matching(rules, req)
        if rules.action == rbac_pb2.RBAC.LOG:
            if hit:
                logged.append(hit)
        elif rules.action == rbac_pb2.RBAC.DENY and hit:
            return Decision(False, f"filter {i}: DENY policy matched", hit, tuple(logged), tuple(shadow))
        elif rules.action == rbac_pb2.RBAC.ALLOW and not hit:
            return Decision(False, f"filter {i}: no ALLOW policy matched", None, tuple(logged), tuple(shadow))
    return Decision(True, "allowed", None, tuple(logged), tuple(shadow))


_Pair = tuple[rbac_pb2.RBAC | None, rbac_pb2.RBAC | None]


def _pair(cfg: http_rbac_pb2.RBAC | network_rbac_pb2.RBAC) -> _Pair:
    """(rules, shadow_rules); None where the filter has none (absent `rules` enforce nothing)."""
    return (
        cfg.rules if cfg.HasField("rules") else None,
        cfg.shadow_rules if cfg.HasField("shadow_rules") else None,
    )


def evaluate_http(filters: Sequence[hcm_pb2.HttpFilter], req: Request) -> Decision:
    """HTTP filter chain: RBAC filters decide; other filters (router, ...) are passed over."""
    if not req.is_http:
        raise ValueError("evaluate_http needs a request with a method")
    configs = []
    for f in filters:
        cfg = http_rbac_pb2.RBAC()
        if f.typed_config.Unpack(cfg):
            configs.append(_pair(cfg))
    return _evaluate(configs, req)


def evaluate_tcp(filters: Sequence[listener_components_pb2.Filter], req: Request) -> Decision:
    """Network filter chain: only what a connection carries (no method, path or headers)."""
    if req.is_http:
        req = Request(
            req.source_ip,
            req.destination_ip,
            req.destination_port,
            req.source_principal,
            req.sni,
            remote_ip=req.remote_ip,
        )
    configs = []
    for f in filters:
        cfg = network_rbac_pb2.RBAC()
        if f.typed_config.Unpack(cfg):
            configs.append(_pair(cfg))
    return _evaluate(configs, req)
