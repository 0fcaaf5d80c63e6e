"""Restart without a gap: which of the kernel's XFRM objects a starting bridge can prove are its own tunnels.

A bridge that dies (SIGKILL, OOM, an upgrade) leaves its SAs and policies in the node's kernel, where they keep
carrying traffic. A new bridge instance must not break that traffic, nor trust what it cannot explain. At
start, `plan_adoption` (pure) reads a dump of the kernel's SAs and policies and decides, object by object:

Candidates are objects carrying the bridge's mark (`Layout.mark`), plus SAs whose reqid is in the bridge's
range (`Layout.reqid_base`); everything else belongs to someone else and is left alone.

A tunnel is *provable* when every one of these holds:

1. Its out policy has the shape this configuration installs: priority `pair_priority`, ALLOW, a plain
   selector (no proto, ports or interface) from a local pod /32 (/128) to a peer pod /32, both inside the mesh
   CIDRs, and one ESP tunnel-mode template from this node's address to the peer node's with a reqid of ours.
   This node's address is --node-address when given, else the one local end every out policy agrees on (the
   state sync later checks it against WDS).
2. The in and fwd policies of the same pod pair exist, with a reqid-0 template from the peer node to this node.
   In node scope, every pod pair of the node pair must point its out policy at the *same* reqid (they are
   switched in one batch); pairs missing their in/fwd policies are dropped from the tunnel.
3. The generation the out policy points at is complete: exactly one outbound SA (this node -> peer node) and
   one inbound SA (peer node -> this node) with that reqid, whose selectors are the pair's (node scope: any ->
   any), ESP in tunnel mode with an rfc4106 AES-GCM key (so not a larval ALLOCSPI state) and an SPI in our range.
4. Other generations of the same tunnel (a crash inside a rekey's grace period) are kept only as complete
   inbound+outbound sets; they retire after the grace period, as in a normal rekey.

An adopted tunnel is kept in the kernel untouched until the workload state is synced; then
`ipsec_bridge.tunnels.adoption` either finds the same tunnel (same endpoints) in what the current
policies admit and rekeys it make-before-break, or removes it. Objects failing any check - half sets (an
inbound SA whose handshake never finished), larval states, unknown reqids, policies of shapes we never install,
SAs no complete policy set refers to - are removed at start, policies first (out before in/fwd, so their
traffic falls to the block), then SAs. The block policies are never removed: missing ones are (re)installed
with UPDPOLICY, which replaces in place, and no policy sharing a block policy's id is ever deleted.

On-demand set-up: a local pod's trap is kept with its pod's complete bypass set (`SaManager.start` re-writes
the traps in place); the holds made for ACQUIREs (a pair's trap, a flow hold) are removed, since the ACQUIREs
they served died with the previous run; a larval state's reqid (the trap's) never counts as a generation's.

Nothing adopted is ever written again: no UPDSA, so no key is installed twice and a GCM nonce (the SA's
sequence number under that key) cannot repeat; each replacement comes from a fresh handshake with fresh SPIs.
Reqids continue above the highest one found, and SPIs held by adopted SAs are known to the allocator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import AEAD_RFC4106_GCM_AES, IPPROTO_ESP, Mode, PolicyAction, PolicyDir

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
PairSelector = tuple[IPNetwork, IPNetwork]  # (local pod net, peer pod net)
_SaKey = tuple[IPAddress, IPAddress, IPNetwork, IPNetwork]  # outer src, outer dst, selector src, selector dst


@dataclass(frozen=True, slots=True)
class Layout:
    """What the bridge's current configuration installs: the yardstick for every object in the dump."""

    scope: TunnelScope
    mesh_cidrs: tuple[IPNetwork, ...]
    mark: m.Mark
    block: tuple[m.Policy, ...]
    reqid_base: int
    reqid_mask: int
    spi_min: int
    pair_priority: int
    bypass_priority: int
    node_address: IPAddress | None = None
    # on-demand set-up (ipsec_bridge/sa_manager.py): a local pod's trap (priority trap_priority, kept with its
    # pod's bypass set; 0: set-up is eager, traps are removed) and the holds made for ACQUIREs (never kept: the
    # ACQUIREs they were for died with the previous run, and the pod's trap asks again)
    trap_priority: int = 0
    trap_reqid: int = 0
    hold_priorities: frozenset[int] = frozenset()

    def our_reqid(self, reqid: int) -> bool:
        return (reqid & self.reqid_mask) == self.reqid_base and bool(reqid & ~self.reqid_mask)

    def in_mesh(self, net: IPNetwork) -> bool:
        return any(net.version == mesh.version and net.subnet_of(mesh) for mesh in self.mesh_cidrs)  # type: ignore[arg-type]

    def pod_net(self, net: IPNetwork) -> bool:
        return net.prefixlen == net.max_prefixlen and self.in_mesh(net)


@dataclass(frozen=True, slots=True)
class AdoptedGeneration:
    reqid: int
    spi_in: int
    spi_out: int
    key_bytes: int
    added: int  # when the kernel added the outbound SA (unix seconds; 0 if unknown)
    packets_in: int = 0
    packets_out: int = 0


@dataclass(frozen=True, slots=True)
class AdoptedTunnel:
    """A tunnel found complete in the kernel: its outer/inner addresses, pod pairs and generations."""

    scope: TunnelScope
    local_node: IPAddress
    peer_node: IPAddress
    local_net: IPNetwork
    peer_net: IPNetwork
    selectors: tuple[PairSelector, ...]
    current: AdoptedGeneration
    older: tuple[AdoptedGeneration, ...] = ()

    def generations(self) -> tuple[AdoptedGeneration, ...]:
        return (self.current, *self.older)

    def describe(self) -> str:
        if self.scope is TunnelScope.POD:
            inner = f"{self.local_net.network_address} <-> {self.peer_net.network_address}"
        else:
            inner = f"{len(self.selectors)} pod pair(s)"
        g = self.current
        return (
            f"{inner} via {self.local_node} <-> {self.peer_node} reqid 0x{g.reqid:08x} "
            f"spi in 0x{g.spi_in:08x} out 0x{g.spi_out:08x}"
        )


@dataclass(frozen=True, slots=True)
class Removal:
    """One object to delete at start, and why (for the log: never key material)."""

    target: m.SaId | m.PolicyId
    what: str  # "sa" or "policy"
    description: str
    reason: str


@dataclass(frozen=True, slots=True)
class AdoptionPlan:
    tunnels: tuple[AdoptedTunnel, ...]
    bypass: tuple[IPAddress, ...]  # local pods whose bypass policies are complete
    missing_block: tuple[m.Policy, ...]  # block policies to (re)install before anything is removed
    remove_policies: tuple[Removal, ...]  # out policies first
    remove_sas: tuple[Removal, ...]
    highest_reqid: int  # low bits of the highest reqid of ours in the kernel (0: none)
    local_node: IPAddress | None = None

    def held_spis(self) -> frozenset[tuple[IPAddress, int]]:
        """(destination, SPI) of every adopted SA: a new allocation must never return one of these."""
        out: set[tuple[IPAddress, int]] = set()
        for t in self.tunnels:
            for g in t.generations():
                out.add((t.local_node, g.spi_in))
                out.add((t.peer_node, g.spi_out))
        return frozenset(out)


def _any_net(version: int) -> IPNetwork:
    return ip_network("0.0.0.0/0") if version == 4 else ip_network("::/0")


def _plain(sel: m.Selector) -> bool:
    return not (sel.proto or sel.sport or sel.dport or sel.ifindex)


def _policy_shape(p: m.Policy) -> tuple[object, ...]:
    s = p.selector
    return (s.src, s.dst, s.proto, s.sport, s.dport, s.ifindex, p.direction, p.action, p.priority, p.mark,
            p.templates, p.if_id, p.ptype)  # fmt: skip


def _policy_removal(p: m.Policy, reason: str) -> Removal:
    return Removal(p.id(), "policy", p.describe(), reason)


def _sa_removal(sa: m.SecurityAssociation, reason: str) -> Removal:
    return Removal(sa.id(), "sa", sa.describe(), reason)


def _bypass_ip(p: m.Policy, layout: Layout) -> IPAddress | None:
    """The local pod a bypass policy is for, when it has exactly the shape `SaManager` installs."""
    s = p.selector
    if p.priority != layout.bypass_priority or p.action != PolicyAction.ALLOW or p.templates or not _plain(s):
        return None
    if p.direction == PolicyDir.OUT and s.src in layout.mesh_cidrs and layout.pod_net(s.dst):
        return s.dst.network_address
    if p.direction == PolicyDir.FWD and s.dst in layout.mesh_cidrs and layout.pod_net(s.src):
        return s.src.network_address
    return None


def _trap_shaped(p: m.Policy, layout: Layout) -> bool:
    """An out policy whose only template is the on-demand trap's (transport mode, trap reqid, no addresses)."""
    if p.direction != PolicyDir.OUT or p.action != PolicyAction.ALLOW or len(p.templates) != 1 or not layout.trap_reqid:
        return False
    t = p.templates[0]
    return (t.mode == Mode.TRANSPORT and t.reqid == layout.trap_reqid and t.src is None and t.dst is None
            and t.proto == IPPROTO_ESP and not t.optional)  # fmt: skip


def _trap_ip(p: m.Policy, layout: Layout) -> IPAddress | None:
    """The local pod a trap policy is for, when it has exactly the shape `SaManager.trap_policies` installs."""
    s = p.selector
    if p.priority != layout.trap_priority or not _trap_shaped(p, layout) or not _plain(s):
        return None
    return s.src.network_address if s.dst in layout.mesh_cidrs and layout.pod_net(s.src) else None


def _pair_template(p: m.Policy, layout: Layout) -> m.Template | None:
    """The template of a per-pair policy of our shape, or None."""
    s = p.selector
    if p.priority != layout.pair_priority or p.action != PolicyAction.ALLOW or len(p.templates) != 1:
        return None
    if not (_plain(s) and layout.pod_net(s.src) and layout.pod_net(s.dst)):
        return None
    t = p.templates[0]
    if t.mode != Mode.TUNNEL or t.proto != IPPROTO_ESP or t.src is None or t.dst is None or t.optional:
        return None
    if t.src.version != s.src.version or t.src == t.dst:
        return None
    if p.direction == PolicyDir.OUT:
        return t if layout.our_reqid(t.reqid) else None
    return t if t.reqid == 0 else None


def _sa_flaw(sa: m.SecurityAssociation, layout: Layout) -> str | None:
    """Why an SA with our mark (or reqid) cannot be part of a tunnel of ours; None when it can."""
    if sa.mark != layout.mark:
        return "reqid in the bridge's range without the bridge's mark"
    if not layout.our_reqid(sa.reqid):
        return f"reqid 0x{sa.reqid:08x} is not one the bridge allocates"
    if sa.aead is None:
        return "larval state (an SPI reserved by ALLOCSPI, never keyed)"
    if sa.aead.name != AEAD_RFC4106_GCM_AES or sa.proto != IPPROTO_ESP or sa.mode != Mode.TUNNEL:
        return "not an ESP tunnel-mode AES-GCM SA"
    if sa.spi < layout.spi_min:
        return f"SPI 0x{sa.spi:08x} is below the bridge's range"
    s = sa.selector
    if not _plain(s):
        return "selector with ports, protocol or interface"
    if layout.scope is TunnelScope.POD and not (layout.pod_net(s.src) and layout.pod_net(s.dst)):
        return "pod scope, but the selector is not a mesh pod pair"
    if layout.scope is TunnelScope.NODE and not (s.src.prefixlen == 0 and s.dst.prefixlen == 0):
        return "node scope, but the selector is not any -> any"
    return None


@dataclass(slots=True)
class _Candidate:
    local: IPAddress
    peer: IPAddress
    local_net: IPNetwork
    peer_net: IPNetwork
    reqid: int
    selectors: list[PairSelector] = field(default_factory=list)
    policies: list[m.Policy] = field(default_factory=list)  # out policies first


def plan_adoption(sas: Sequence[m.SaInfo], policies: Sequence[m.PolicyInfo], layout: Layout) -> AdoptionPlan:
    """Pure: split the dump into adoptable tunnels, complete bypass sets, and objects to remove (with reasons)."""
    remove_policies: list[Removal] = []
    remove_sas: list[Removal] = []
    highest = 0

    # --- policies -------------------------------------------------------------------------------------------
    block_shapes = {_policy_shape(p): p for p in layout.block}
    block_ids = {p.id() for p in layout.block}
    present: set[tuple[object, ...]] = set()
    bypass: dict[IPAddress, list[m.Policy]] = {}
    traps: dict[IPAddress, list[m.Policy]] = {}
    outs: list[tuple[m.Policy, m.Template]] = []
    inbound: dict[tuple[IPNetwork, IPNetwork, PolicyDir], tuple[m.Policy, m.Template]] = {}
    for info in policies:
        p = info.policy
        if p.mark != layout.mark:
            continue
        shape = _policy_shape(p)
        if shape in block_shapes:
            present.add(shape)
            continue
        if p.id() in block_ids:
            continue  # same id as a block policy: the UPDPOLICY below replaces it, deleting it would open a gap
        ip = _bypass_ip(p, layout)
        if ip is not None:
            bypass.setdefault(ip, []).append(p)
            continue
        if layout.trap_priority:
            ip = _trap_ip(p, layout)
            if ip is not None:
                traps.setdefault(ip, []).append(p)
                continue
        tmpl = _pair_template(p, layout)
        if tmpl is None and p.priority in layout.hold_priorities and _trap_shaped(p, layout):
            remove_policies.append(_policy_removal(p, "an on-demand hold of the previous run (its ACQUIRE is gone)"))
        elif tmpl is None:
            remove_policies.append(_policy_removal(p, "not a policy this bridge installs"))
        elif p.direction == PolicyDir.OUT:
            highest = max(highest, tmpl.reqid & ~layout.reqid_mask)
            outs.append((p, tmpl))
        else:
            inbound[(p.selector.src, p.selector.dst, p.direction)] = (p, tmpl)
    missing_block = tuple(p for shape, p in block_shapes.items() if shape not in present)

    complete_bypass: list[IPAddress] = []
    for ip, found in bypass.items():
        wanted = {(d, mesh) for mesh in layout.mesh_cidrs if mesh.version == ip.version
                  for d in (PolicyDir.OUT, PolicyDir.FWD)}  # fmt: skip
        have = {(p.direction, p.selector.src if p.direction == PolicyDir.OUT else p.selector.dst) for p in found}
        if have == wanted:
            complete_bypass.append(ip)
        else:
            remove_policies.extend(_policy_removal(p, f"incomplete bypass set for pod {ip}") for p in found)
    for ip, found in traps.items():  # a trap stays with its pod's bypass set (SaManager.start re-writes it)
        if ip not in complete_bypass:
            remove_policies.extend(_policy_removal(p, f"trap of pod {ip}, whose bypass set is not complete")
                                   for p in found)  # fmt: skip

    # --- this node's address --------------------------------------------------------------------------------
    local = layout.node_address
    if local is None:
        ends = {t.src for _, t in outs if t.src is not None}
        if len(ends) == 1:
            local = next(iter(ends))
        elif len(ends) > 1:
            listed = ", ".join(sorted(map(str, ends)))
            remove_policies.extend(_policy_removal(p, f"out policies name several local nodes ({listed})")
                                   for p, _ in outs)  # fmt: skip
            outs = []
    kept_outs = []
    for p, t in outs:
        if t.src != local:
            remove_policies.append(_policy_removal(p, f"local end {t.src} is not this node's address {local}"))
        else:
            kept_outs.append((p, t))

    # --- candidate tunnels from complete policy sets ----------------------------------------------------------
    claimed: set[tuple[IPNetwork, IPNetwork, PolicyDir]] = set()

    def pair_policies(p: m.Policy, t: m.Template) -> list[m.Policy] | None:
        """The in+fwd policies of an out policy's pair, when both exist and point back at it."""
        found = []
        for d in (PolicyDir.IN, PolicyDir.FWD):
            entry = inbound.get((p.selector.dst, p.selector.src, d))
            if entry is None or entry[1].src != t.dst or entry[1].dst != t.src:
                return None
            found.append(entry[0])
        return found

    candidates: list[_Candidate] = []
    if layout.scope is TunnelScope.POD:
        for p, t in kept_outs:
            assert t.src is not None and t.dst is not None
            back = pair_policies(p, t)
            if back is None:
                remove_policies.append(_policy_removal(p, "its pair has no matching in/fwd policies"))
                continue
            sel = (p.selector.src, p.selector.dst)
            claimed.update((p.selector.dst, p.selector.src, d) for d in (PolicyDir.IN, PolicyDir.FWD))
            candidates.append(_Candidate(t.src, t.dst, sel[0], sel[1], t.reqid, [sel], [p, *back]))
    else:
        by_peer: dict[IPAddress, list[tuple[m.Policy, m.Template]]] = {}
        for p, t in kept_outs:
            assert t.dst is not None
            by_peer.setdefault(t.dst, []).append((p, t))
        for peer, group in by_peer.items():
            reqids = {t.reqid for _, t in group}
            if len(reqids) != 1:
                why = f"out policies towards {peer} point at {len(reqids)} generations"
                for p, _ in group:
                    remove_policies.append(_policy_removal(p, why))
                continue
            any_net = _any_net(peer.version)
            cand = _Candidate(group[0][1].src or peer, peer, any_net, any_net, group[0][1].reqid)
            backs: list[m.Policy] = []
            for p, t in sorted(group, key=lambda pt: (str(pt[0].selector.src), str(pt[0].selector.dst))):
                back = pair_policies(p, t)
                if back is None:
                    remove_policies.append(_policy_removal(p, "its pair has no matching in/fwd policies"))
                    continue
                claimed.update((p.selector.dst, p.selector.src, d) for d in (PolicyDir.IN, PolicyDir.FWD))
                cand.selectors.append((p.selector.src, p.selector.dst))
                cand.policies.append(p)
                backs.extend(back)
            if cand.selectors:
                cand.policies.extend(backs)
                candidates.append(cand)
    for pkey, (p, _) in inbound.items():
        if pkey not in claimed:
            remove_policies.append(_policy_removal(p, "no out policy of ours for its pair"))

    # --- SAs ------------------------------------------------------------------------------------------------
    index: dict[_SaKey, dict[int, list[m.SaInfo]]] = {}
    for sa_info in sas:
        sa = sa_info.sa
        if sa.mark != layout.mark and (sa.reqid & layout.reqid_mask) != layout.reqid_base:
            continue
        if sa.mark == layout.mark and layout.our_reqid(sa.reqid) and sa.reqid != layout.trap_reqid:
            # (an ACQUIRE's larval state carries the trap's reqid, the top of the range: never a generation's)
            highest = max(highest, sa.reqid & ~layout.reqid_mask)
        flaw = _sa_flaw(sa, layout)
        if flaw is not None:
            remove_sas.append(_sa_removal(sa, flaw))
            continue
        sa_key = (sa.src, sa.dst, sa.selector.src, sa.selector.dst)
        index.setdefault(sa_key, {}).setdefault(sa.reqid, []).append(sa_info)

    def generation(out: list[m.SaInfo], into: list[m.SaInfo], reqid: int) -> AdoptedGeneration | None:
        if len(out) != 1 or len(into) != 1:
            return None
        o, i = out[0], into[0]
        assert o.sa.aead is not None
        return AdoptedGeneration(reqid, i.sa.spi, o.sa.spi, len(o.sa.aead.key), o.current.add_time,
                                 i.current.packets, o.current.packets)  # fmt: skip

    tunnels: list[AdoptedTunnel] = []
    for c in candidates:
        out_key = (c.local, c.peer, c.local_net, c.peer_net)
        in_key = (c.peer, c.local, c.peer_net, c.local_net)
        out_gens, in_gens = index.pop(out_key, {}), index.pop(in_key, {})
        current = generation(out_gens.get(c.reqid, []), in_gens.get(c.reqid, []), c.reqid)
        everything = [i for gens in (out_gens, in_gens) for lst in gens.values() for i in lst]
        if current is None:
            why = (f"generation 0x{c.reqid:08x} its out policy uses has {len(out_gens.get(c.reqid, []))} outbound "
                   f"and {len(in_gens.get(c.reqid, []))} inbound SA(s), not one of each")  # fmt: skip
            remove_policies.extend(_policy_removal(p, why) for p in c.policies)
            remove_sas.extend(_sa_removal(i.sa, why) for i in everything)
            continue
        older: list[AdoptedGeneration] = []
        for reqid in sorted((out_gens.keys() | in_gens.keys()) - {c.reqid}):
            gen = generation(out_gens.get(reqid, []), in_gens.get(reqid, []), reqid)
            if gen is not None:
                older.append(gen)
            else:
                why = f"half of generation 0x{reqid:08x} (an unfinished or rolled-back handshake)"
                remove_sas.extend(_sa_removal(i.sa, why) for i in out_gens.get(reqid, []) + in_gens.get(reqid, []))
        tunnels.append(AdoptedTunnel(layout.scope, c.local, c.peer, c.local_net, c.peer_net,
                                     tuple(c.selectors), current, tuple(older)))  # fmt: skip
    for gens in index.values():
        for lst in gens.values():
            remove_sas.extend(_sa_removal(i.sa, "no complete policy set of ours refers to it") for i in lst)

    out_first = sorted(remove_policies, key=lambda r: 0 if isinstance(r.target, m.PolicyId)
                       and r.target.direction == PolicyDir.OUT else 1)  # fmt: skip
    return AdoptionPlan(
        tunnels=tuple(tunnels),
        bypass=tuple(sorted(complete_bypass, key=lambda ip: (ip.version, int(ip)))),
        missing_block=missing_block,
        remove_policies=tuple(out_first),
        remove_sas=tuple(remove_sas),
        highest_reqid=highest,
        local_node=local,
    )


def summary(plan: AdoptionPlan) -> str:
    return (
        f"{len(plan.tunnels)} tunnel(s) and {len(plan.bypass)} local pod bypass set(s) adopted; "
        f"{len(plan.remove_policies)} policies and {len(plan.remove_sas)} SAs removed; "
        f"{len(plan.missing_block)} block policies (re)installed"
    )


def removal_reasons(removals: Iterable[Removal]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in removals:
        out[r.reason] = out.get(r.reason, 0) + 1
    return out
