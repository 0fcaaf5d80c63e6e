"""Pure parser: YAML text (what a user would `kubectl apply`) -> registry objects, or errors with file:line.

No IO happens here; files.py reads the folder. Every problem becomes a `ConfigError` pointing at the
document or field that caused it, and the document is dropped; the caller decides what to do with a
partially broken folder (the file source keeps the last good snapshot).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ztcore.mesh.registry.objects import (
    AuthorizationPolicy,
    Condition,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    FrozenMap,
    Labels,
    Namespace,
    NodeAddress,
    ObjectKey,
    ObjectMeta,
    ObjectReference,
    Operation,
    PeerAuthentication,
    Pod,
    PolicyTargetReference,
    RegistryObject,
    Rule,
    Service,
    ServiceAccount,
    ServicePort,
    Source,
    default_uid,
)
from ztcore.mesh.registry.objects import Node as KubeNode

AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
PROTOCOLS = ("TCP", "UDP", "SCTP")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
IP_FAMILIES = ("IPv4", "IPv6")
ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")

# Alias expansion can blow a small file up exponentially ("billion laughs"); no real manifest is this big.
MAX_NODES_PER_DOCUMENT = 200_000

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MERGE_TAG = "tag:yaml.org,2002:merge"
# libyaml's composer when PyYAML was built with it: the same nodes and line marks, about 10x faster.
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class ConfigError:
    source: str
    line: int  # 1-based; 0 when the problem is the file itself (unreadable)
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class Located:
    """A parsed object and where its document starts, for duplicate reports."""

    obj: RegistryObject
    source: str
    line: int


@dataclass(frozen=True, slots=True)
class ParseResult:
    located: tuple[Located, ...]
    errors: tuple[ConfigError, ...]
    # Documents of kinds the registry does not read ("apps/v1 Deployment" -> count); legal, so no error.
    skipped: FrozenMap[str, int]

    @property
    def objects(self) -> tuple[RegistryObject, ...]:
        return tuple(loc.obj for loc in self.located)


def parse_documents(text: str, source: str) -> tuple[list[RegistryObject], list[ConfigError]]:
    """Parse one file's text; `source` names it in errors. Duplicates within the text are errors."""
    result = parse_text(text, source)
    return list(result.objects), list(result.errors)


def parse_text(text: str, source: str) -> ParseResult:
    return parse_sources([(source, text)])


def parse_sources(sources: Iterable[tuple[str, str]]) -> ParseResult:
    """Parse several (source, text) pairs as one folder: duplicates are detected across all of them."""
    return combine([parse_file(text, source) for source, text in sources])


def parse_file(text: str, source: str) -> ParseResult:
    """One file on its own, without the folder-wide checks (see `combine`): a folder source re-parses only
    the files that changed and combines them with the others' earlier results."""
    located: list[Located] = []
    errors: list[ConfigError] = []
    skipped: Counter[str] = Counter()
    _parse_stream(text, source, located, errors, skipped)
    return ParseResult(tuple(located), tuple(errors), FrozenMap(sorted(skipped.items())))


def combine(files: Iterable[ParseResult]) -> ParseResult:
    """Files of one folder, in order, as one result: duplicate objects and pod IPs across them are errors."""
    located: list[Located] = []
    errors: list[ConfigError] = []
    skipped: Counter[str] = Counter()
    for f in files:
        located.extend(f.located)
        errors.extend(f.errors)
        skipped.update(dict(f.skipped))
    kept = _drop_conflicts(located, errors)
    return ParseResult(tuple(kept), tuple(errors), FrozenMap(sorted(skipped.items())))


def parse_object(data: object) -> RegistryObject | None:
    """One object that is already plain data (an API server's JSON) -> the same model and checks as YAML.

    None for kinds the registry does not read; ValueError with the field path when the object is invalid.
    """
    try:
        if not isinstance(data, dict):
            raise _Invalid((), f"object must be a mapping, got {_type_name(data)}")
        r = _Reader(data, ())
        return _parse_object(r, r.required_str("apiVersion"), r.required_str("kind"))
    except _Invalid as e:
        raise ValueError(e.message) from None


def _drop_conflicts(located: list[Located], errors: list[ConfigError]) -> list[Located]:
    """Report the second of two objects with the same key, or two live pods claiming one IP."""
    kept: list[Located] = []
    first: dict[ObjectKey, Located] = {}
    ip_owner: dict[str, Located] = {}
    for loc in located:
        obj = loc.obj
        prev = first.get(obj.key)
        if prev is not None:
            errors.append(
                ConfigError(
                    loc.source,
                    loc.line,
                    f"duplicate {_describe(obj)} (first defined at {prev.source}:{prev.line})",
                )
            )
            continue
        if isinstance(obj, Pod) and _owns_ip(obj):
            # An IP maps to an identity; two live pods on one IP would make that mapping ambiguous.
            clash = next((ip_owner[ip] for ip in obj.pod_ips if ip in ip_owner), None)
            if clash is not None:
                errors.append(
                    ConfigError(
                        loc.source,
                        loc.line,
                        f"{_describe(obj)}: pod IP already used by {_describe(clash.obj)} "
                        f"({clash.source}:{clash.line})",
                    )
                )
                continue
            for ip in obj.pod_ips:
                ip_owner[ip] = loc
        first[obj.key] = loc
        kept.append(loc)
    return kept


def claimed_ips(obj: RegistryObject) -> frozenset[str]:
    """The pod IPs this object holds exclusively (none for other kinds): two objects may not share one."""
    return frozenset(obj.pod_ips) if isinstance(obj, Pod) and _owns_ip(obj) else frozenset()


def _owns_ip(pod: Pod) -> bool:
    # Host-network pods share the node's IP, and finished pods have released theirs.
    return not pod.host_network and pod.phase not in ("Succeeded", "Failed")


def _describe(obj: RegistryObject) -> str:
    return f"{obj.kind} {obj.namespace}/{obj.name}" if obj.namespaced else f"{obj.kind} {obj.name}"


# --- YAML -> plain data, remembering the line of every field ------------------------------------------------

Path: TypeAlias = tuple[str | int, ...]
_KindParser: TypeAlias = "Callable[[_Reader, ObjectMeta], RegistryObject]"


class _Invalid(Exception):
    """A problem in one document; `path` locates the field."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.line = line  # overrides the path's line (duplicate keys point at the second key)


class _Document:
    """One YAML document as plain data plus the line of each field (1-based)."""

    def __init__(self, root: Node, constructor: yaml.constructor.SafeConstructor) -> None:
        self.lines: dict[Path, int] = {(): root.start_mark.line + 1}
        self.data: object = None
        self._root = root
        self._constructor = constructor
        self._budget = MAX_NODES_PER_DOCUMENT
        self._active: set[int] = set()

    def build(self) -> None:
        self.data = self._convert(self._root, ())

    def error_line(self, e: _Invalid) -> int:
        return e.line if e.line is not None else self.line(e.path)

    def line(self, path: Path) -> int:
        while path not in self.lines:
            path = path[:-1]
        return self.lines[path]

    def _convert(self, node: Node, path: Path) -> object:
        self._budget -= 1
        if self._budget < 0:
            raise _Invalid(path, f"document too large (more than {MAX_NODES_PER_DOCUMENT} YAML nodes)")
        if isinstance(node, ScalarNode):
            return self._constructor.construct_object(node, deep=True)
        if id(node) in self._active:
            raise _Invalid(path, "recursive YAML alias")
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                items: list[object] = []
                for i, child in enumerate(node.value):
                    self.lines[(*path, i)] = child.start_mark.line + 1
                    items.append(self._convert(child, (*path, i)))
                return items
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            raise _Invalid(path, f"unsupported YAML node {type(node).__name__}")
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: MappingNode, path: Path) -> dict[object, object]:
        # PyYAML keeps the last of two equal keys; in a policy that silently drops half of it.
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, path)
            if key in seen:
                raise _Invalid(
                    path,
                    f"{_fmt_path((*path, str(key)))}: duplicate key (first at line {seen[key]})",
                    line=key_node.start_mark.line + 1,
                )
            seen[key] = key_node.start_mark.line + 1
        self._constructor.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        out: dict[object, object] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            child: Path = (*path, str(key))
            self.lines[child] = key_node.start_mark.line + 1
            out[key] = self._convert(value_node, child)
        return out

    def _key(self, node: Node, path: Path) -> object:
        if not isinstance(node, ScalarNode):
            raise _Invalid(path, "mapping keys must be scalars")
        return self._constructor.construct_object(node, deep=True)


def _fmt_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _parse_stream(
    text: str, source: str, located: list[Located], errors: list[ConfigError], skipped: Counter[str]
) -> None:
    # Only the constructor, on the nodes composed below: a whole SafeLoader would be a reference cycle (its parser
    # state is a bound method) holding every node and mark of the file until the cyclic collector runs.
    constructor = yaml.constructor.SafeConstructor()
    if source.lower().endswith(".json"):
        # JSON is YAML, except that PyYAML rejects tab indentation. Valid JSON cannot hold a raw tab
        # inside a string, so every tab is whitespace and a space means the same (lines stay put).
        text = text.replace("\t", " ")
    try:
        for root in yaml.compose_all(text, Loader=_COMPOSER):
            if root is None:
                continue
            if isinstance(root, ScalarNode) and root.tag == "tag:yaml.org,2002:null":
                continue  # a document holding only comments or `~`
            doc = _Document(root, constructor)
            try:
                doc.build()
            except _Invalid as e:
                errors.append(ConfigError(source, doc.error_line(e), e.message))
                continue
            _parse_document(doc, doc.data, (), source, located, errors, skipped)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        detail = "; ".join(p for p in (e.context, e.problem) if p)
        errors.append(ConfigError(source, line, f"invalid YAML: {detail}"))
    except yaml.YAMLError as e:
        errors.append(ConfigError(source, 0, f"invalid YAML: {e}"))
    except RecursionError:
        errors.append(ConfigError(source, 0, "invalid YAML: nesting too deep"))


def _parse_document(
    doc: _Document,
    data: object,
    path: Path,
    source: str,
    located: list[Located],
    errors: list[ConfigError],
    skipped: Counter[str],
) -> None:
    try:
        if not isinstance(data, dict):
            raise _Invalid(path, f"document must be a mapping, got {_type_name(data)}")
        r = _Reader(data, path)
        api_version = r.required_str("apiVersion")
        kind = r.required_str("kind")
        if kind == "List" and api_version == "v1":
            for i, item in enumerate(r.seq("items")):
                _parse_document(doc, item, (*path, "items", i), source, located, errors, skipped)
            return
        obj = _parse_object(r, api_version, kind)
    except _Invalid as e:
        errors.append(ConfigError(source, doc.error_line(e), e.message))
        return
    if obj is None:
        skipped[f"{api_version} {kind}"] += 1
    else:
        located.append(Located(obj, source, doc.line(path)))


def _parse_object(r: _Reader, api_version: str, kind: str) -> RegistryObject | None:
    # Dispatch on (group, kind): a same-named kind of another API group is someone else's CRD.
    group = api_version.rpartition("/")[0]
    core = _core_parser(kind) if group == "" else None
    if core is not None:
        if api_version != "v1":
            r.fail("apiVersion", f"unsupported apiVersion {api_version!r} for {kind} (expected v1)")
        meta = _meta(r, kind, namespaced=kind not in ("Namespace", "Node"))
        return _with_context(r, kind, meta, core)
    if group == "discovery.k8s.io" and kind == "EndpointSlice":
        if api_version != "discovery.k8s.io/v1":
            r.fail("apiVersion", f"unsupported apiVersion {api_version!r} for EndpointSlice")
        return _with_context(r, kind, _meta(r, kind, namespaced=True), _endpoint_slice)
    if group == "security.istio.io" and kind in ("AuthorizationPolicy", "PeerAuthentication"):
        if api_version not in ISTIO_SECURITY_VERSIONS:
            r.fail(
                "apiVersion",
                f"unsupported apiVersion {api_version!r} for {kind} (expected {' or '.join(ISTIO_SECURITY_VERSIONS)})",
            )
        parser = _authorization_policy if kind == "AuthorizationPolicy" else _peer_authentication
        return _with_context(r, kind, _meta(r, kind, namespaced=True), parser)
    return None


def _with_context(r: _Reader, kind: str, meta: ObjectMeta, parser: _KindParser) -> RegistryObject:
    try:
        return parser(r, meta)
    except _Invalid as e:
        name = f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name
        raise _Invalid(e.path, f"{kind} {name}: {e.message}") from None


# --- field readers ------------------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), type(value).__name__
    )


class _Reader:
    """Typed access to one mapping of a document; every failure carries the field's path."""

    __slots__ = ("data", "path")

    def __init__(self, data: dict[object, object], path: Path) -> None:
        self.data = data
        self.path = path

    def at(self, key: str | int) -> Path:
        return (*self.path, key)

    def fail(self, key: str | int | None, message: str) -> NoReturn:
        path = self.path if key is None else self.at(key)
        raise _Invalid(path, f"{_fmt_path(path)}: {message}" if path else message)

    def get(self, key: str) -> object:
        # Kubernetes treats an explicit null like an absent field.
        return self.data.get(key)

    def only(self, *allowed: str) -> None:
        """Reject unknown fields, as `kubectl apply` (strict field validation) does for these CRDs."""
        for key in self.data:
            if key not in allowed:
                self.fail(str(key), f"unknown field (expected one of {', '.join(allowed)})")

    def mapping(self, key: str, *, required: bool = False) -> _Reader | None:
        value = self.get(key)
        if value is None:
            if required:
                self.fail(key, "required field is missing")
            return None
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {_type_name(value)}")
        return _Reader(value, self.at(key))

    def required_str(self, key: str) -> str:
        value = self.get(key)
        if value is None or value == "":
            self.fail(key, "required field is missing")
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_type_name(value)}")
        return value

    def string(self, key: str, default: str = "") -> str:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_type_name(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            self.fail(key, f"unknown value {value!r} (expected one of {', '.join(choices)})")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_type_name(value)}")
        return value

    def port(self, key: str, *, required: bool = False) -> int | None:
        value = self.get(key)
        if value is None:
            if required:
                self.fail(key, "required field is missing")
            return None
        return _port(value, self.at(key))

    def seq(self, key: str) -> list[object]:
        value = self.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {_type_name(value)}")
        return value

    def mappings(self, key: str) -> list[_Reader]:
        out = []
        for i, item in enumerate(self.seq(key)):
            if not isinstance(item, dict):
                path = (*self.at(key), i)
                raise _Invalid(path, f"{_fmt_path(path)}: must be a mapping, got {_type_name(item)}")
            out.append(_Reader(item, (*self.at(key), i)))
        return out

    def strs(self, key: str) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self.seq(key)):
            if not isinstance(item, str):
                path = (*self.at(key), i)
                raise _Invalid(path, f"{_fmt_path(path)}: must be a string, got {_type_name(item)}")
            out.append(item)
        return tuple(out)

    def str_map(self, key: str) -> Labels:
        m = self.mapping(key)
        if m is None:
            return FrozenMap()
        for k, v in m.data.items():
            if not isinstance(k, str):
                m.fail(str(k), "keys must be strings")
            if not isinstance(v, str):
                m.fail(k, f"must be a string, got {_type_name(v)} (quote it)")
        return FrozenMap(sorted((str(k), str(v)) for k, v in m.data.items()))


def _port(value: object, path: Path) -> int:
    # bool is an int subclass in Python; `port: true` must not become port 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(path, f"{_fmt_path(path)}: must be an integer port, got {_type_name(value)}")
    if not 1 <= value <= 65535:
        raise _Invalid(path, f"{_fmt_path(path)}: port {value} out of range 1-65535")
    return value


def _ip(value: str, path: Path) -> str:
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise _Invalid(path, f"{_fmt_path(path)}: {value!r} is not an IP address") from None


def _ip_or_cidr(value: str, path: Path) -> str:
    try:
        # strict=False: Istio accepts host bits in a CIDR (netip.ParsePrefix), so must we.
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Invalid(path, f"{_fmt_path(path)}: {value!r} is not an IP address or CIDR") from None
    return value


def _ips(r: _Reader, key: str) -> tuple[str, ...]:
    return tuple(_ip(v, (*r.at(key), i)) for i, v in enumerate(r.strs(key)))


# --- metadata and core kinds --------------------------------------------------------------------------


def _meta(r: _Reader, kind: str, *, namespaced: bool) -> ObjectMeta:
    m = r.mapping("metadata", required=True)
    assert m is not None
    name = m.required_str("name")
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        m.fail("name", f"invalid name {name!r} (lowercase letters, digits, '-' and '.')")
    namespace = ""
    if namespaced:
        # kubectl puts objects without a namespace into "default".
        namespace = m.string("namespace", "default") or "default"
        if len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
            m.fail("namespace", f"invalid namespace {namespace!r}")
    uid = m.string("uid") or default_uid(kind, namespace, name)
    return ObjectMeta(name, namespace, uid, m.str_map("labels"), m.str_map("annotations"))


def _namespace(r: _Reader, meta: ObjectMeta) -> Namespace:
    if len(meta.name) > 63 or not _DNS_LABEL.fullmatch(meta.name):
        path = (*r.path, "metadata", "name")
        raise _Invalid(path, f"{_fmt_path(path)}: invalid namespace name {meta.name!r} (at most 63 characters, no '.')")
    return Namespace(meta)


def _service_account(r: _Reader, meta: ObjectMeta) -> ServiceAccount:
    return ServiceAccount(meta)


def _node(r: _Reader, meta: ObjectMeta) -> KubeNode:
    status = r.mapping("status")
    addresses: list[NodeAddress] = []
    for a in status.mappings("addresses") if status else []:
        addresses.append(NodeAddress(a.required_str("type"), a.required_str("address")))
    return KubeNode(meta, tuple(addresses))


def _pod(r: _Reader, meta: ObjectMeta) -> Pod:
    spec = r.mapping("spec") or _Reader({}, r.at("spec"))
    # serviceAccount is the deprecated spelling; serviceAccountName wins when both are set.
    sa = spec.string("serviceAccountName") or spec.string("serviceAccount") or "default"
    ports: list[ContainerPort] = []
    for container in spec.mappings("initContainers") + spec.mappings("containers"):
        for p in container.mappings("ports"):
            port = p.port("containerPort", required=True)
            assert port is not None
            ports.append(ContainerPort(port, p.string("name"), p.choice("protocol", PROTOCOLS, "TCP")))
    status = r.mapping("status") or _Reader({}, r.at("status"))
    ips: tuple[str, ...] = ()
    if status.get("podIPs") is not None:
        ips = tuple(_ip(p.required_str("ip"), p.at("ip")) for p in status.mappings("podIPs"))
    elif status.get("podIP") is not None:
        ips = (_ip(status.required_str("podIP"), status.at("podIP")),)
    return Pod(
        meta,
        service_account=sa,
        node_name=spec.string("nodeName"),
        pod_ips=ips,
        phase=status.choice("phase", POD_PHASES, "Running"),
        host_network=spec.flag("hostNetwork"),
        container_ports=tuple(ports),
    )


def _service(r: _Reader, meta: ObjectMeta) -> Service:
    spec = r.mapping("spec") or _Reader({}, r.at("spec"))
    cluster_ips: list[str] = []
    # clusterIPs[0] == clusterIP when both are set; "None" marks a headless service.
    candidates = [(ip, (*spec.at("clusterIPs"), i)) for i, ip in enumerate(spec.strs("clusterIPs"))]
    if spec.get("clusterIP") is not None:
        candidates.insert(0, (spec.string("clusterIP"), spec.at("clusterIP")))
    for value, path in candidates:
        if value in ("None", ""):
            continue
        ip = _ip(value, path)
        if ip not in cluster_ips:
            cluster_ips.append(ip)
    ports: list[ServicePort] = []
    for p in spec.mappings("ports"):
        port = p.port("port", required=True)
        assert port is not None
        target: int | str = port
        raw_target = p.get("targetPort")
        if isinstance(raw_target, str):
            # A named port must contain a letter; "8080" in quotes is a mistake Kubernetes rejects too.
            if not _PORT_NAME.fullmatch(raw_target) or raw_target.isdigit() or len(raw_target) > 15:
                p.fail("targetPort", f"{raw_target!r} is neither a port number nor a valid port name")
            target = raw_target
        elif raw_target is not None:
            target = _port(raw_target, p.at("targetPort"))
        protocol = p.choice("protocol", PROTOCOLS, "TCP")
        ports.append(ServicePort(port, target, p.string("name"), protocol, p.string("appProtocol") or None))
    kind = spec.string("type", "ClusterIP")
    families = tuple(spec.strs("ipFamilies"))
    for i, family in enumerate(families):
        if family not in IP_FAMILIES:
            path = (*spec.at("ipFamilies"), i)
            raise _Invalid(path, f"{_fmt_path(path)}: must be IPv4 or IPv6, got {family!r}")
    if len(set(families)) != len(families):
        spec.fail("ipFamilies", "lists a family twice")
    if spec.get("ipFamilies") is None and kind != "ExternalName":
        # What the API server fills in: the families of the given cluster IPs, else the cluster's (IPv4 here).
        families = tuple(dict.fromkeys(_family(ip) for ip in cluster_ips)) or ("IPv4",)
    return Service(
        meta,
        selector=spec.str_map("selector"),
        cluster_ips=tuple(cluster_ips),
        ports=tuple(ports),
        type=kind,
        ip_families=families,
    )


def _family(ip: str) -> str:
    return "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"


def _endpoint_slice(r: _Reader, meta: ObjectMeta) -> EndpointSlice:
    address_type = r.get("addressType")
    if address_type is None:
        r.fail("addressType", "required field is missing")
    address_type = r.choice("addressType", ADDRESS_TYPES, "")
    endpoints: list[Endpoint] = []
    for e in r.mappings("endpoints"):
        addresses = e.strs("addresses")
        if address_type != "FQDN":
            addresses = _ips(e, "addresses")
        ref = None
        t = e.mapping("targetRef")
        if t is not None:
            ref = ObjectReference(
                t.required_str("kind"), t.required_str("name"), t.string("namespace"), t.string("uid")
            )
        conditions = e.mapping("conditions")
        ready = conditions.flag("ready", True) if conditions else True
        endpoints.append(Endpoint(addresses, ref, e.string("nodeName"), ready))
    ports = tuple(
        EndpointPort(
            p.port("port"),
            p.string("name"),
            p.choice("protocol", PROTOCOLS, "TCP"),
            p.string("appProtocol") or None,
        )
        for p in r.mappings("ports")
    )
    return EndpointSlice(meta, address_type, tuple(endpoints), ports)


# --- Istio security -----------------------------------------------------------------------------------


def _selector(spec: _Reader) -> Labels | None:
    sel = spec.mapping("selector")
    if sel is None:
        return None
    sel.only("matchLabels")
    return sel.str_map("matchLabels")


# (Istio API field, attribute) pairs; tuples, so nothing at module level can be mutated.
_SOURCE_FIELDS = (
    ("principals", "principals"),
    ("notPrincipals", "not_principals"),
    ("requestPrincipals", "request_principals"),
    ("notRequestPrincipals", "not_request_principals"),
    ("namespaces", "namespaces"),
    ("notNamespaces", "not_namespaces"),
    ("serviceAccounts", "service_accounts"),
    ("notServiceAccounts", "not_service_accounts"),
    ("ipBlocks", "ip_blocks"),
    ("notIpBlocks", "not_ip_blocks"),
    ("remoteIpBlocks", "remote_ip_blocks"),
    ("notRemoteIpBlocks", "not_remote_ip_blocks"),
    ("trustDomains", "trust_domains"),
    ("notTrustDomains", "not_trust_domains"),
)
_IP_BLOCK_FIELDS = ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_STR_FIELDS = (
    ("hosts", "hosts"),
    ("notHosts", "not_hosts"),
    ("methods", "methods"),
    ("notMethods", "not_methods"),
    ("paths", "paths"),
    ("notPaths", "not_paths"),
)
# `when` keys whose values Istio validates as addresses or ports.
_IP_KEYS = ("source.ip", "remote.ip", "destination.ip")
_PORT_KEYS = ("destination.port",)


def _source(r: _Reader) -> Source:
    r.only(*(field for field, _ in _SOURCE_FIELDS))
    values: dict[str, tuple[str, ...]] = {}
    for field, attr in _SOURCE_FIELDS:
        items = r.strs(field)
        if field in _IP_BLOCK_FIELDS:
            items = tuple(_ip_or_cidr(v, (*r.at(field), i)) for i, v in enumerate(items))
        values[attr] = items
    # Istio's CRD rule: serviceAccounts cannot be combined with principals or namespaces.
    if (r.get("serviceAccounts") or r.get("notServiceAccounts")) and any(
        r.get(k) for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")
    ):
        r.fail(None, "serviceAccounts/notServiceAccounts cannot be combined with principals or namespaces")
    return Source(**values)


def _operation_ports(r: _Reader, key: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(r.seq(key)):
        path = (*r.at(key), i)
        # The API says strings; a bare number is what people write, and both mean the same port.
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Invalid(path, f"{_fmt_path(path)}: {v!r} is not a port number")
        out.append(_port(v, path))
    return tuple(out)


def _operation(r: _Reader) -> Operation:
    r.only("ports", "notPorts", *(field for field, _ in _OPERATION_STR_FIELDS))
    strs = {attr: r.strs(field) for field, attr in _OPERATION_STR_FIELDS}
    return Operation(ports=_operation_ports(r, "ports"), not_ports=_operation_ports(r, "notPorts"), **strs)


def _condition(r: _Reader) -> Condition:
    r.only("key", "values", "notValues")
    key = r.required_str("key")
    values, not_values = r.strs("values"), r.strs("notValues")
    if not values and not not_values:
        r.fail(None, f"condition {key!r} needs values or notValues")
    for field, items in (("values", values), ("notValues", not_values)):
        for i, v in enumerate(items):
            path = (*r.at(field), i)
            if key in _IP_KEYS:
                _ip_or_cidr(v, path)
            elif key in _PORT_KEYS:
                _port(int(v) if v.isdigit() else v, path)
    return Condition(key, values, not_values)


def _rule(r: _Reader) -> Rule:
    r.only("from", "to", "when")
    sources = []
    for f in r.mappings("from"):
        f.only("source")
        s = f.mapping("source")
        sources.append(_source(s) if s else Source())
    operations = []
    for t in r.mappings("to"):
        t.only("operation")
        o = t.mapping("operation")
        operations.append(_operation(o) if o else Operation())
    return Rule(tuple(sources), tuple(operations), tuple(_condition(w) for w in r.mappings("when")))


def _target_ref(r: _Reader) -> PolicyTargetReference:
    r.only("group", "kind", "name", "namespace")
    return PolicyTargetReference(
        r.required_str("kind"), r.required_str("name"), r.string("group"), r.string("namespace")
    )


def _authorization_policy(r: _Reader, meta: ObjectMeta) -> AuthorizationPolicy:
    spec = r.mapping("spec") or _Reader({}, r.at("spec"))
    spec.only("selector", "targetRef", "targetRefs", "rules", "action", "provider")
    selector = _selector(spec)
    action = spec.choice("action", AUTHZ_ACTIONS, "ALLOW")
    refs: list[PolicyTargetReference] = []
    single = spec.mapping("targetRef")
    if single is not None:
        refs.append(_target_ref(single))
    multi = spec.mappings("targetRefs")
    if single is not None and multi:
        spec.fail("targetRefs", "only one of targetRef or targetRefs can be set")
    refs.extend(_target_ref(t) for t in multi)
    if selector is not None and refs:
        spec.fail("selector", "only one of selector or targetRef(s) can be set")
    provider = None
    p = spec.mapping("provider")
    if p is not None:
        p.only("name")
        provider = p.required_str("name")
    if action == "CUSTOM" and provider is None:
        spec.fail("provider", "action CUSTOM requires provider.name")
    if action != "CUSTOM" and provider is not None:
        spec.fail("provider", f"provider is only allowed with action CUSTOM, not {action}")
    rules = tuple(_rule(rule) for rule in spec.mappings("rules"))
    return AuthorizationPolicy(meta, selector, action, rules, tuple(refs), provider)


def _peer_authentication(r: _Reader, meta: ObjectMeta) -> PeerAuthentication:
    spec = r.mapping("spec") or _Reader({}, r.at("spec"))
    spec.only("selector", "mtls", "portLevelMtls")
    selector = _selector(spec)
    mode = "UNSET"
    mtls = spec.mapping("mtls")
    if mtls is not None:
        mtls.only("mode")
        mode = mtls.choice("mode", MTLS_MODES, "UNSET")
    port_modes: dict[int, str] = {}
    plm = spec.mapping("portLevelMtls")
    if plm is not None:
        if not selector:
            spec.fail("portLevelMtls", "port-level mTLS needs a workload selector")
        for key, value in plm.data.items():
            # YAML keys may be numbers (8080:) or strings ("8080":); both name the port.
            path = plm.at(str(key))
            port = _port(int(key) if isinstance(key, str) and key.isdigit() else key, path)
            if not isinstance(value, dict):
                raise _Invalid(path, f"{_fmt_path(path)}: must be a mapping, got {_type_name(value)}")
            entry = _Reader(value, path)
            entry.only("mode")
            port_modes[port] = entry.choice("mode", MTLS_MODES, "UNSET")
    return PeerAuthentication(meta, selector, mode, FrozenMap(sorted(port_modes.items())))


def _core_parser(kind: str) -> _KindParser | None:
    parsers: dict[str, _KindParser] = {
        "Namespace": _namespace,
        "ServiceAccount": _service_account,
        "Node": _node,
        "Pod": _pod,
        "Service": _service,
    }
    return parsers.get(kind)
