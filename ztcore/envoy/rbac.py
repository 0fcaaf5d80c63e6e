"""AuthorizationPolicy -> Envoy RBAC filters for sidecars, shaped as istiod builds them.

Facts followed (istio/istio): pilot/pkg/security/authz/builder/builder.go (filter per action, order AUDIT, DENY,
ALLOW; CUSTOM before them; names and stat prefixes; match-never policy for `spec: {}`), model/model.go and
generator.go (which attribute becomes a permission or a principal, in which order; HTTP-only attributes on TCP
chains), matcher/{string,header}.go (`*` presence/prefix/suffix), trustdomain/bundle.go (aliases),
pkg/config/security/security.go (which `when` keys validation accepts), pilot/pkg/model/authorization.go and
policyattachment.go (which policies apply to a sidecar).

Pure: no IO, no clock. Invalid or unsupported input raises ValueError naming the policy.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2

from ztcore.envoy.common import network_filter, pack
from ztcore.mesh.registry.objects import AuthorizationPolicy, FrozenMap, Labels, Operation, Rule, Source

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
TCP_STAT_PREFIX = "tcp."  # authzmodel.RBACTCPFilterStatPrefix
SHADOW_ALLOW_STAT_PREFIX = "istio_dry_run_allow_"
SHADOW_DENY_STAT_PREFIX = "istio_dry_run_deny_"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
EXT_AUTHZ_PREFIX = "istio-ext-authz"
BAD_CUSTOM_SUFFIX = "-deny-due-to-bad-CUSTOM-action"
SPIFFE_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"

# Envoy's own header names for what the API calls hosts and methods.
_AUTHORITY = ":authority"
_METHOD = ":method"

# `when` keys istiod's validation rejects with a reason of its own (pkg/config/security ValidateAttribute).
_REPLACED_KEYS = {
    "destination.namespace": "is replaced by the metadata.namespace",
    "destination.name": "is deprecated: only supported in v1alpha1",
    "destination.user": "is deprecated: only supported in v1alpha1",
}
# Keys that need a RequestAuthentication's JWT claims in list form; ztd configures no jwt_authn filter.
_JWT_LIST_KEYS = ("request.auth.audiences", "request.auth.presenter", "request.auth.claims")


class _Action(enum.Enum):
    ALLOW = rbac_pb2.RBAC.ALLOW
    DENY = rbac_pb2.RBAC.DENY
    LOG = rbac_pb2.RBAC.LOG


@dataclass(frozen=True, slots=True)
class RbacFilters:
    """What one sidecar gets. `http` and `tcp` start with the CUSTOM filters, if any: istiod puts those before
    its authn filter and the rest after it. `messages` holds status notes per policy (`namespace/name`)."""

    http: tuple[hcm_pb2.HttpFilter, ...]
    tcp: tuple[listener_components_pb2.Filter, ...]
    messages: FrozenMap[str, tuple[str, ...]]


class _HttpOnlyError(Exception):
    """An attribute an HTTP filter can see but a network filter cannot (generator.go `%q is HTTP only`)."""


# --- which policies apply ---------------------------------------------------------------------------------


def policies_for(
    policies: Iterable[AuthorizationPolicy], namespace: str, labels: Labels, root_namespace: str
) -> tuple[AuthorizationPolicy, ...]:
    """The policies istiod applies to a sidecar in `namespace` with `labels`.

    Root namespace first, then the workload's (ListAuthorizationPolicies). A policy applies when it has no
    targetRef(s) (those are for gateways and waypoints; a sidecar ignores them) and its selector is absent or a
    subset of the labels. The namespace does not enter the selector check, so a root-namespace policy with a
    selector applies to matching workloads in every namespace, as in istiod.
    """
    if GATEWAY_NAME_LABEL in labels:
        raise ValueError(
            f"workload in {namespace!r} has label {GATEWAY_NAME_LABEL}: it is a Gateway API gateway, "
            "and policies_for() selects policies for sidecars only"
        )
    # istiod orders by creation time, then name, then namespace; the registry keeps no creation time.
    ordered = sorted(policies, key=lambda p: (p.name, p.namespace))
    out: list[AuthorizationPolicy] = []
    for ns in dict.fromkeys((root_namespace, namespace)):
        for p in ordered:
            if p.namespace != ns or p.target_refs:
                continue
            if p.selector is None or all(labels.get(k) == v for k, v in p.selector.items()):
                out.append(p)
    return tuple(out)


# --- public builders ----------------------------------------------------------------------------------------


def build(
    policies: Sequence[AuthorizationPolicy],
    *,
    trust_domain: str,
    trust_domain_aliases: Sequence[str] = (),
    stat_prefix: str = TCP_STAT_PREFIX,
) -> RbacFilters:
    """HTTP and network RBAC filters for `policies` (already selected, e.g. by `policies_for`)."""
    if not trust_domain:
        raise ValueError("trust_domain must not be empty")
    for p in policies:
        _validate(p)
    bundle = (trust_domain, *trust_domain_aliases)
    notes = _Notes()
    http = _filters(policies, bundle, False, stat_prefix, notes)
    tcp = _filters(policies, bundle, True, stat_prefix, notes)
    return RbacFilters(
        tuple(f for f in http if isinstance(f, hcm_pb2.HttpFilter)),
        tuple(f for f in tcp if isinstance(f, listener_components_pb2.Filter)),
        notes.frozen(),
    )


def http_filters(
    policies: Sequence[AuthorizationPolicy], *, trust_domain: str, trust_domain_aliases: Sequence[str] = ()
) -> list[hcm_pb2.HttpFilter]:
    return list(build(policies, trust_domain=trust_domain, trust_domain_aliases=trust_domain_aliases).http)


def network_filters(
    policies: Sequence[AuthorizationPolicy],
    *,
    trust_domain: str,
    stat_prefix: str = TCP_STAT_PREFIX,
    trust_domain_aliases: Sequence[str] = (),
) -> list[listener_components_pb2.Filter]:
    built = build(
        policies, trust_domain=trust_domain, trust_domain_aliases=trust_domain_aliases, stat_prefix=stat_prefix
    )
    return list(built.tcp)


# --- status notes -----------------------------------------------------------------------------------------


class _Notes:
    """Messages per policy, first-seen order, no repeats (HTTP and TCP passes report some things twice)."""

    def __init__(self) -> None:
        self._by_policy: dict[str, dict[str, None]] = {}

    def add(self, policy: AuthorizationPolicy, text: str) -> None:
        self._by_policy.setdefault(f"{policy.namespace}/{policy.name}", {})[text] = None

    def frozen(self) -> FrozenMap[str, tuple[str, ...]]:
        return FrozenMap(sorted((k, tuple(v)) for k, v in self._by_policy.items()))


# --- validation (what istiod's webhook would refuse, plus what ztd cannot express) ---------------------------


def _fail(policy: AuthorizationPolicy, text: str) -> ValueError:
    return ValueError(f"AuthorizationPolicy {policy.namespace}/{policy.name}: {text}")


def _map_key_ok(key: str) -> bool:
    open_at = key.find("[")
    return key.endswith("]") and 0 < open_at < len(key) - 2


def _check_service_accounts(policy: AuthorizationPolicy, where: str, values: Sequence[str]) -> None:
    """pkg/config/security CheckServiceAccount."""
    if len(values) > 16:
        raise _fail(policy, f"{where}: may not have more than 16 values")
    for v in values:
        if "*" in v:
            raise _fail(policy, f"{where}: wildcard not allowed, found {v!r}")
        ns, slash, sa = v.partition("/")
        if v.count("/") > 1 or (slash and not (ns and sa)):
            raise _fail(policy, f"{where}: expected 'serviceAccount' or 'namespace/serviceAccount', found {v!r}")
        if len(v) > 320:
            raise _fail(policy, f"{where}: value cannot exceed 320 characters, found {v!r}")


def _check_path(policy: AuthorizationPolicy, where: str, path: str) -> None:
    if "{" in path or "}" in path:
        # istiod turns {*}/{**} into a uri_template matcher; this converter does not build those.
        raise _fail(policy, f"{where}: path templates ({path!r}) are not supported by ztd")


def _validate(policy: AuthorizationPolicy) -> None:
    if policy.action == "CUSTOM" and not policy.provider:
        raise _fail(policy, "action CUSTOM needs provider.name")
    for i, rule in enumerate(policy.rules):
        at = f"rules[{i}]"
        for j, src in enumerate(rule.from_):
            where = f"{at}.from[{j}]"
            for field in Source.__dataclass_fields__:
                if "" in getattr(src, field):
                    raise _fail(policy, f"{where}.{field}: empty value not allowed")
            if src.trust_domains or src.not_trust_domains:
                raise _fail(policy, f"{where}: trustDomains/notTrustDomains are not supported by ztd")
            _check_service_accounts(policy, f"{where}.serviceAccounts", src.service_accounts)
            _check_service_accounts(policy, f"{where}.notServiceAccounts", src.not_service_accounts)
        for j, op in enumerate(rule.to):
            where = f"{at}.to[{j}]"
            for field in Operation.__dataclass_fields__:
                if "" in getattr(op, field):
                    raise _fail(policy, f"{where}.{field}: empty value not allowed")
            for path in (*op.paths, *op.not_paths):
                _check_path(policy, f"{where}.paths", path)
        for j, cond in enumerate(rule.when):
            _check_condition(policy, f"{at}.when[{j}]", cond.key, (*cond.values, *cond.not_values))


def _check_condition(policy: AuthorizationPolicy, where: str, key: str, values: Sequence[str]) -> None:
    if "" in values:
        raise _fail(policy, f"{where}: empty value not allowed in {key}")
    if key in _REPLACED_KEYS:
        raise _fail(policy, f"{where}: attribute {key} {_REPLACED_KEYS[key]}")
    if key.startswith("destination.labels"):
        raise _fail(policy, f"{where}: attribute {key} is replaced by the workload selector")
    if key.startswith(_JWT_LIST_KEYS):
        raise _fail(policy, f"{where}: {key} needs RequestAuthentication (JWT claims), which ztd does not support")
    prefixed = ("request.headers", "request.experimental.inline.headers", "experimental.envoy.filters.")
    if key.startswith(prefixed):
        if not _map_key_ok(key):
            raise _fail(policy, f"{where}: bad key {key!r}: should have format a[b]")
        return
    if key in ("source.ip", "remote.ip", "destination.ip"):
        for v in values:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise _fail(policy, f"{where}: bad IP address or CIDR {v!r} in {key}") from None
        return
    if key == "destination.port":
        for v in values:
            if not v.isdigit() or int(v) > 65535:
                raise _fail(policy, f"{where}: bad port {v!r} in {key}")
        return
    if key == "source.serviceAccount":
        _check_service_accounts(policy, where, values)
        return
    if key in ("source.namespace", "source.principal", "request.auth.principal", "connection.sni"):
        return
    raise _fail(policy, f"{where}: unknown attribute {key!r}")


# --- matchers (matcher/string.go, header.go) ------------------------------------------------------------------


def _regex(regex: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))


def _string(value: str, prefix: str = "") -> string_pb2.StringMatcher:
    # "*" first: Envoy refuses an empty prefix or suffix. A wildcard is ".+", not ".*".
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        if not prefix:
            return string_pb2.StringMatcher(suffix=value[1:])
        return _regex(prefix + ".*" + value[1:])
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1])
    return string_pb2.StringMatcher(exact=prefix + value)


def _header(name: str, value: str, *, ignore_case: bool = False) -> route_components_pb2.HeaderMatcher:
    if value == "*":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    if value.startswith("*"):
        m = string_pb2.StringMatcher(suffix=value[1:], ignore_case=ignore_case)
    elif value.endswith("*"):
        m = string_pb2.StringMatcher(prefix=value[:-1], ignore_case=ignore_case)
    else:
        m = string_pb2.StringMatcher(exact=value, ignore_case=ignore_case)
    return route_components_pb2.HeaderMatcher(name=name, string_match=m)


_GO_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _quote_meta(text: str) -> str:
    """Go's regexp.QuoteMeta: Python's re.escape also escapes '-', '#', spaces..., which would change the text."""
    return "".join("\\" + c if c in _GO_REGEX_SPECIAL else c for c in text)


def _inline_header(name: str, value: str) -> route_components_pb2.HeaderMatcher:
    """A value anywhere in a comma-joined header (HeaderMatcherWithRegex)."""
    if value == "*":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    if value.startswith("*"):
        v = ".*" + _quote_meta(value[1:])
    elif value.endswith("*"):
        v = _quote_meta(value[:-1]) + ".*"
    else:
        v = _quote_meta(value)
    regex = f"^{v}$|^{v},.*|.*,{v},.*|.*,{v}$"
    return route_components_pb2.HeaderMatcher(name=name, safe_regex_match=regex_pb2.RegexMatcher(regex=regex))


def _cidr(value: str) -> address_pb2.CidrRange:
    cidr = address_pb2.CidrRange()
    if "/" in value:
        addr, _, bits = value.partition("/")
        cidr.address_prefix = str(ipaddress.ip_address(addr))
        cidr.prefix_len.value = int(bits)
    else:
        ip = ipaddress.ip_address(value)
        cidr.address_prefix = str(ip)
        cidr.prefix_len.value = ip.max_prefixlen
    return cidr


def _bracketed(key: str, prefix: str) -> str:
    return key[len(prefix) :].removeprefix("[").removesuffix("]")


def _metadata(filter_name: str, path: Sequence[str], value: value_pb2.ValueMatcher) -> metadata_pb2.MetadataMatcher:
    return metadata_pb2.MetadataMatcher(
        filter=filter_name, path=[metadata_pb2.MetadataMatcher.PathSegment(key=k) for k in path], value=value
    )


def _or_values(matchers: list[value_pb2.ValueMatcher]) -> value_pb2.ValueMatcher:
    if len(matchers) == 1:
        return matchers[0]
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=matchers))


# --- generators (model/generator.go): one value -> one permission or principal --------------------------------


def _authenticated(m: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=m))


def _http_only(key: str, for_tcp: bool) -> None:
    if for_tcp:
        raise _HttpOnlyError(key)


def _permission(kind: str, key: str, value: str, for_tcp: bool) -> rbac_pb2.Permission:
    if kind == "destination.ip":
        return rbac_pb2.Permission(destination_ip=_cidr(value))
    if kind == "destination.port":
        return rbac_pb2.Permission(destination_port=int(value))
    if kind == "connection.sni":
        return rbac_pb2.Permission(requested_server_name=_string(value))
    _http_only(key, for_tcp)
    if kind == "hosts":
        return rbac_pb2.Permission(header=_header(_AUTHORITY, value, ignore_case=True))
    if kind == "methods":
        return rbac_pb2.Permission(header=_header(_METHOD, value))
    if kind == "paths":
        return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string(value)))
    raise AssertionError(f"no permission generator for {kind}")


def _principal(kind: str, key: str, value: str, for_tcp: bool, namespace: str) -> rbac_pb2.Principal:
    if kind == "source.ip":
        return rbac_pb2.Principal(direct_remote_ip=_cidr(value))
    if kind == "remote.ip":
        return rbac_pb2.Principal(remote_ip=_cidr(value))
    if kind == "source.namespace":
        return _authenticated(_regex(f".*/ns/{value.replace('*', '.*')}/.*"))
    if kind == "source.serviceAccount":
        ns, slash, sa = value.partition("/")
        if not slash:
            ns, sa = namespace, value  # a bare name means the policy's own namespace
        return _authenticated(_regex(f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"))
    if kind == "source.principal":
        return _authenticated(_string(value, SPIFFE_PREFIX))
    _http_only(key, for_tcp)
    if kind == "request.headers":
        return rbac_pb2.Principal(header=_header(_bracketed(key, "request.headers"), value))
    if kind == "request.experimental.inline.headers":
        return rbac_pb2.Principal(header=_inline_header(_bracketed(key, kind), value))
    raise AssertionError(f"no principal generator for {kind}")


def _envoy_filter_permission(key: str, values: Sequence[str]) -> rbac_pb2.Permission:
    """`experimental.envoy.filters.a.b[c]` -> metadata of filter envoy.filters.a.b at key c, values ORed."""
    filter_name, _, field = key.removeprefix("experimental.").removesuffix("]").partition("[")
    matchers = []
    for v in values:
        if v.startswith("[") and v.endswith("]"):
            one = value_pb2.ValueMatcher(string_match=_string(v.strip("[]")))
            matchers.append(value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=one)))
        else:
            matchers.append(value_pb2.ValueMatcher(string_match=_string(v)))
    return rbac_pb2.Permission(metadata=_metadata(filter_name, (field,), _or_values(matchers)))


_ANY_CLAIM = _regex(".+")


def _jwt_claim(claim: str, m: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        metadata=_metadata(JWT_FILTER, (JWT_PAYLOAD, claim), value_pb2.ValueMatcher(string_match=m))
    )


def _request_principal(key: str, values: Sequence[str], for_tcp: bool) -> rbac_pb2.Principal:
    """`<iss>/<sub>` against the jwt_authn payload: iss and sub each matched, `*` on either side."""
    _http_only(key, for_tcp)
    ors = []
    for value in values:
        iss, slash, sub = value.rpartition("/")  # the issuer may be a URL, so the last '/'
        if not slash:
            iss, sub = value, ""
        if value == "*":
            m_iss, m_sub = _ANY_CLAIM, _ANY_CLAIM
        elif value.startswith("*"):
            if slash:
                m_iss = _ANY_CLAIM if iss == "*" else string_pb2.StringMatcher(suffix=iss[1:])
                m_sub = string_pb2.StringMatcher(exact=sub)
            else:
                m_iss, m_sub = _ANY_CLAIM, string_pb2.StringMatcher(suffix=value[1:])
        elif value.endswith("*"):
            if slash:
                m_iss = string_pb2.StringMatcher(exact=iss)
                m_sub = _ANY_CLAIM if sub == "*" else string_pb2.StringMatcher(prefix=sub[:-1])
            else:
                m_iss, m_sub = string_pb2.StringMatcher(prefix=value[:-1]), _ANY_CLAIM
        else:
            m_iss, m_sub = string_pb2.StringMatcher(exact=iss), string_pb2.StringMatcher(exact=sub)
        ors.append(_principal_and([_jwt_claim("iss", m_iss), _jwt_claim("sub", m_sub)]))
    return ors[0] if len(ors) == 1 else rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ors))


def _principal_and(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids))


# --- the rule model (model/model.go) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Term:
    kind: str  # which generator
    key: str  # the attribute as the user wrote it (for `when` keys with brackets)
    values: tuple[str, ...]
    not_values: tuple[str, ...]


_PERMISSION_KEYS = ("destination.ip", "destination.port", "connection.sni")
_PRINCIPAL_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.serviceAccount", "source.principal")


def _when_term(key: str, values: tuple[str, ...], not_values: tuple[str, ...]) -> tuple[bool, _Term]:
    """(is_permission, term) for a `when` condition; validation already refused the rest."""
    if key in _PERMISSION_KEYS:
        return True, _Term(key, key, values, not_values)
    if key.startswith("experimental.envoy.filters."):
        return True, _Term("experimental.envoy.filters.", key, values, not_values)
    if key in _PRINCIPAL_KEYS or key == "request.auth.principal":
        return False, _Term(key, key, values, not_values)
    if key.startswith("request.headers"):
        return False, _Term("request.headers", key, values, not_values)
    return False, _Term("request.experimental.inline.headers", key, values, not_values)


def _port_strs(ports: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(str(p) for p in ports)  # istiod keeps ports as strings until the generator


def _terms(
    rule: Rule,
) -> tuple[list[list[_Term]], list[list[_Term]]]:
    """Permissions (one AND-list per `to`) and principals (one per `from`), terms in istiod's order."""
    base_perm: list[_Term] = []
    base_princ: list[_Term] = []
    for cond in rule.when:
        is_perm, term = _when_term(cond.key, cond.values, cond.not_values)
        (base_perm if is_perm else base_princ).append(term)

    def front(items: Iterable[tuple[str, tuple[str, ...], tuple[str, ...]]], base: list[_Term]) -> list[_Term]:
        # insertFront, applied in the given order: the last one given ends up first.
        out = list(base)
        for kind, values, not_values in items:
            if values or not_values:
                out.insert(0, _Term(kind, kind, values, not_values))
        return out

    principals = [
        front(
            (
                ("source.ip", s.ip_blocks, s.not_ip_blocks),
                ("remote.ip", s.remote_ip_blocks, s.not_remote_ip_blocks),
                ("source.namespace", s.namespaces, s.not_namespaces),
                ("source.serviceAccount", s.service_accounts, s.not_service_accounts),
                ("request.auth.principal", s.request_principals, s.not_request_principals),
                ("source.principal", s.principals, s.not_principals),
            ),
            base_princ,
        )
        for s in rule.from_
    ] or [base_princ]
    permissions = [
        front(
            (
                ("destination.port", _port_strs(o.ports), _port_strs(o.not_ports)),
                ("paths", o.paths, o.not_paths),
                ("methods", o.methods, o.not_methods),
                ("hosts", o.hosts, o.not_hosts),
            ),
            base_perm,
        )
        for o in rule.to
    ] or [base_perm]
    return permissions, principals


def _migrate(values: tuple[str, ...], bundle: Sequence[str]) -> tuple[str, ...]:
    """trustdomain.Bundle.ReplaceTrustDomainAliases: `cluster.local` and aliases stand for every local domain."""
    out: list[str] = []
    for principal in values:
        parts = principal.split("/")
        if len(parts) != 5 or parts[0] == "*":
            out.append(principal)  # trust domain not enforced
            continue
        td = parts[0]
        if not (_td_match(td, bundle) or td == DEFAULT_TRUST_DOMAIN):
            out.append(principal)
            continue
        seen: list[str] = []
        for local in bundle:
            new = principal if _suffix(local, td) else "/".join((local, *parts[1:]))
            if new not in seen:
                seen.append(new)
        out.extend(seen)
    return tuple(out)


def _prefix(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _suffix(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _td_match(a: str, items: Sequence[str]) -> bool:
    return any(a == s or s == "*" or _prefix(a, s) or _prefix(s, a) or _suffix(a, s) or _suffix(s, a) for s in items)


class _Gen:
    """Generate one rule's Policy; HTTP-only attributes fail an ALLOW rule and are skipped otherwise."""

    def __init__(self, action: _Action, for_tcp: bool, namespace: str, dropped: dict[str, None]) -> None:
        self.action, self.for_tcp, self.namespace, self.dropped = action, for_tcp, namespace, dropped

    def _skip(self, error: _HttpOnlyError) -> None:
        """model.go checkError: an ALLOW rule gets smaller (all of it goes), a DENY/AUDIT rule wider (the value)."""
        self.dropped[str(error)] = None
        if self.action is _Action.ALLOW:
            raise error

    def _permission(self, t: _Term, values: tuple[str, ...]) -> rbac_pb2.Permission | None:
        if t.kind == "experimental.envoy.filters.":
            return _envoy_filter_permission(t.key, values)  # metadata: seen on TCP chains too
        ors = []
        for v in values:
            try:
                ors.append(_permission(t.kind, t.key, v, self.for_tcp))
            except _HttpOnlyError as e:
                self._skip(e)
        return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=ors)) if ors else None

    def _principal(self, t: _Term, values: tuple[str, ...]) -> rbac_pb2.Principal | None:
        if t.kind == "request.auth.principal":
            try:
                return _request_principal(t.key, values, self.for_tcp)
            except _HttpOnlyError as e:
                self._skip(e)
                return None
        ors = []
        for v in values:
            try:
                ors.append(_principal(t.kind, t.key, v, self.for_tcp, self.namespace))
            except _HttpOnlyError as e:
                self._skip(e)
        return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ors)) if ors else None

    def permissions(self, terms: list[_Term]) -> rbac_pb2.Permission:
        rules: list[rbac_pb2.Permission] = []
        for t in terms:
            if t.values and (one := self._permission(t, t.values)) is not None:
                rules.append(one)
            if t.not_values and (one := self._permission(t, t.not_values)) is not None:
                rules.append(rbac_pb2.Permission(not_rule=one))
        return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules or [rbac_pb2.Permission(any=True)]))

    def principals(self, terms: list[_Term]) -> rbac_pb2.Principal:
        ids: list[rbac_pb2.Principal] = []
        for t in terms:
            if t.values and (one := self._principal(t, t.values)) is not None:
                ids.append(one)
            if t.not_values and (one := self._principal(t, t.not_values)) is not None:
                ids.append(rbac_pb2.Principal(not_id=one))
        return _principal_and(ids or [rbac_pb2.Principal(any=True)])


def _rule_policy(
    policy: AuthorizationPolicy,
    rule: Rule,
    action: _Action,
    for_tcp: bool,
    bundle: Sequence[str],
    dropped: dict[str, None],
) -> rbac_pb2.Policy | None:
    """None when an ALLOW rule uses HTTP-only attributes on a TCP chain (istiod skips the rule)."""
    permissions, principals = _terms(rule)
    principals = [
        [
            _Term(t.kind, t.key, _migrate(t.values, bundle), _migrate(t.not_values, bundle))
            if t.kind == "source.principal"
            else t
            for t in terms
        ]
        for terms in principals
    ]
    gen = _Gen(action, for_tcp, policy.namespace, dropped)
    try:
        return rbac_pb2.Policy(
            permissions=[gen.permissions(terms) for terms in permissions],
            principals=[gen.principals(terms) for terms in principals],
        )
    except _HttpOnlyError:
        return None


_MATCH_NEVER = rbac_pb2.Policy(
    permissions=[rbac_pb2.Permission(not_rule=rbac_pb2.Permission(any=True))],
    principals=[rbac_pb2.Principal(not_id=rbac_pb2.Principal(any=True))],
)


def _policy_name(policy: AuthorizationPolicy, index: int, provider: str | None) -> str:
    prefix = f"{EXT_AUTHZ_PREFIX}-{provider}-" if provider else ""
    return f"{prefix}ns[{policy.namespace}]-policy[{policy.name}]-rule[{index}]"


def _parse_bool(text: str) -> bool | None:
    """Go's strconv.ParseBool; None when it would fail."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _is_dry_run(policy: AuthorizationPolicy, notes: _Notes) -> bool:
    raw = policy.meta.annotations.get(DRY_RUN_ANNOTATION)
    if raw is None:
        return False
    value = _parse_bool(raw)
    if value is None:
        notes.add(policy, f"invalid {DRY_RUN_ANNOTATION} value {raw!r}: the policy is enforced")
        return False
    return value


@dataclass(frozen=True, slots=True)
class _Built:
    rules: rbac_pb2.RBAC | None
    shadow: rbac_pb2.RBAC | None


def _build_action(
    policies: Sequence[AuthorizationPolicy],
    action: _Action,
    for_tcp: bool,
    bundle: Sequence[str],
    notes: _Notes,
    provider: str | None = None,
) -> _Built | None:
    if not policies:
        return None
    enforce = rbac_pb2.RBAC(action=action.value)
    shadow = rbac_pb2.RBAC(action=action.value)
    has_enforce = has_shadow = False
    chain = "TCP" if for_tcp else "HTTP"
    for policy in policies:
        dry = _is_dry_run(policy, notes)
        target = shadow if dry else enforce
        if dry:
            has_shadow = True
            notes.add(policy, "dry-run: built as shadow rules, logged but not enforced")
        else:
            has_enforce = True
        for i, rule in enumerate(policy.rules):
            dropped: dict[str, None] = {}
            generated = _rule_policy(policy, rule, action, for_tcp, bundle, dropped)
            keys = ", ".join(_http_only_attributes(rule))
            if generated is None:
                notes.add(policy, f"rule[{i}] is left out of {chain} filter chains: it uses HTTP-only {keys}")
                continue
            if dropped:
                notes.add(
                    policy, f"rule[{i}] on {chain} filter chains ignores HTTP-only {keys}, so it matches more traffic"
                )
            target.policies[_policy_name(policy, i, provider)].CopyFrom(generated)
        if not policy.rules:
            target.policies[_policy_name(policy, 0, provider)].CopyFrom(_MATCH_NEVER)
            notes.add(policy, "no rules: matches no request")
        if _uses_request_principals(policy):
            notes.add(policy, "request principals match jwt_authn metadata, which ztd never sets: they never match")
    return _Built(enforce if has_enforce else None, shadow if has_shadow else None)


def _http_only_attributes(rule: Rule) -> list[str]:
    """What a network filter cannot see in `rule`, named as the API names it (for status messages)."""
    found: dict[str, None] = {}
    for o in rule.to:
        for name, present in (("hosts", o.hosts or o.not_hosts), ("methods", o.methods or o.not_methods)):
            if present:
                found[name] = None
        if o.paths or o.not_paths:
            found["paths"] = None
    if any(s.request_principals or s.not_request_principals for s in rule.from_):
        found["requestPrincipals"] = None
    for c in rule.when:
        if c.key.startswith(("request.", "request.experimental.")):
            found[c.key] = None
    return list(found)


def _uses_request_principals(policy: AuthorizationPolicy) -> bool:
    return any(
        any(s.request_principals or s.not_request_principals for s in r.from_)
        or any(c.key == "request.auth.principal" for c in r.when)
        for r in policy.rules
    )


def _shadow_prefix(shadow: rbac_pb2.RBAC | None) -> str:
    if shadow is None:
        return ""
    if shadow.action == rbac_pb2.RBAC.ALLOW:
        return SHADOW_ALLOW_STAT_PREFIX
    if shadow.action == rbac_pb2.RBAC.DENY:
        return SHADOW_DENY_STAT_PREFIX
    return ""


def _wrap(built: _Built, for_tcp: bool, stat_prefix: str) -> hcm_pb2.HttpFilter | listener_components_pb2.Filter:
    if for_tcp:
        net = network_rbac_pb2.RBAC(stat_prefix=stat_prefix, shadow_rules_stat_prefix=_shadow_prefix(built.shadow))
        if built.rules is not None:
            net.rules.CopyFrom(built.rules)
        if built.shadow is not None:
            net.shadow_rules.CopyFrom(built.shadow)
        return network_filter(NETWORK_RBAC_FILTER, net)
    http = http_rbac_pb2.RBAC(shadow_rules_stat_prefix=_shadow_prefix(built.shadow))
    if built.rules is not None:
        http.rules.CopyFrom(built.rules)
    if built.shadow is not None:
        http.shadow_rules.CopyFrom(built.shadow)
    return hcm_pb2.HttpFilter(name=HTTP_RBAC_FILTER, typed_config=pack(http))


def _custom_filters(
    policies: Sequence[AuthorizationPolicy], bundle: Sequence[str], for_tcp: bool, stat_prefix: str, notes: _Notes
) -> list[hcm_pb2.HttpFilter | listener_components_pb2.Filter]:
    """ztd defines no extension providers, so every CUSTOM provider is "not found": istiod then denies what the
    policy's rules match (its rules become a DENY filter, names suffixed) rather than letting it through."""
    by_provider: dict[str, list[AuthorizationPolicy]] = {}
    for p in policies:
        by_provider.setdefault(p.provider or "", []).append(p)
    out: list[hcm_pb2.HttpFilter | listener_components_pb2.Filter] = []
    for provider in sorted(by_provider):
        group = by_provider[provider]
        built = _build_action(group, _Action.DENY, for_tcp, bundle, notes, provider=provider)
        assert built is not None
        deny = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
        if built.rules is not None:
            for name, pol in built.rules.policies.items():
                deny.policies[name + BAD_CUSTOM_SUFFIX].CopyFrom(pol)
        for p in group:
            notes.add(
                p,
                f"CUSTOM provider {provider!r} is not defined (ztd has no extension providers): "
                "requests matching its rules are denied",
            )
        if for_tcp:
            out.append(network_filter(NETWORK_RBAC_FILTER, network_rbac_pb2.RBAC(rules=deny, stat_prefix=stat_prefix)))
        else:
            out.append(hcm_pb2.HttpFilter(name=HTTP_RBAC_FILTER, typed_config=pack(http_rbac_pb2.RBAC(rules=deny))))
    return out


def _filters(
    policies: Sequence[AuthorizationPolicy], bundle: Sequence[str], for_tcp: bool, stat_prefix: str, notes: _Notes
) -> list[hcm_pb2.HttpFilter | listener_components_pb2.Filter]:
    def of(action: str) -> list[AuthorizationPolicy]:
        return [p for p in policies if p.action == action]

    out = _custom_filters(of("CUSTOM"), bundle, for_tcp, stat_prefix, notes)
    for api_action, action in (("AUDIT", _Action.LOG), ("DENY", _Action.DENY), ("ALLOW", _Action.ALLOW)):
        built = _build_action(of(api_action), action, for_tcp, bundle, notes)
        if built is not None:
            out.append(_wrap(built, for_tcp, stat_prefix))
    return out


__all__ = [
    "BAD_CUSTOM_SUFFIX",
    "DRY_RUN_ANNOTATION",
    "HTTP_RBAC_FILTER",
    "NETWORK_RBAC_FILTER",
    "SHADOW_ALLOW_STAT_PREFIX",
    "SHADOW_DENY_STAT_PREFIX",
    "TCP_STAT_PREFIX",
    "RbacFilters",
    "build",
    "http_filters",
    "network_filters",
    "policies_for",
]
