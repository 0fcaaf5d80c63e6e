"""Pure encoding and decoding of XFRM netlink messages (no IO, no clock).

Layouts follow include/uapi/linux/xfrm.h on 64-bit Linux (x86_64, aarch64): u64 members make
xfrm_usersa_info (224 bytes), xfrm_userpolicy_info (168) and their containers 8-byte aligned, so the
padding below is explicit. Integers are in host order except SPIs and selector ports (network order).
Key material lives in `Aead` fields with repr=False and in `Request.payload` (repr=False): printing a
model, a request or an exception never shows a key.
"""

from __future__ import annotations

import errno as errno_mod
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from ipsec_bridge.xfrm.consts import (
    AEAD_RFC4106_GCM_AES,
    AF_INET,
    AF_INET6,
    AF_UNSPEC,
    IPPROTO_AH,
    IPPROTO_COMP,
    IPPROTO_ESP,
    IPSEC_PROTO_ANY,
    NLA_HDRLEN,
    NLMSG_HDRLEN,
    XFRM_ALG_NAME_LEN,
    XFRM_INF,
    XFRMA_REPLAY_ESN_MAX,
    Mode,
    NlmFlag,
    NlmsgErrAttr,
    NlmsgType,
    OffloadFlag,
    PolicyAction,
    PolicyDir,
    PolicyFlag,
    PolicyType,
    SaDir,
    SaExtraFlag,
    Share,
    StateFlag,
    XfrmAttr,
    XfrmMsg,
)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_ALL_ALGOS = U32_MAX  # template aalgos/ealgos/calgos: accept any algorithm (what iproute2 sends)
_ESN_MAX_WINDOW = XFRMA_REPLAY_ESN_MAX  # bmp_len <= XFRMA_REPLAY_ESN_MAX / 32 words
_LEGACY_MAX_WINDOW = 32  # without an ESN/bitmap attribute the kernel caps the window at 32

# --- struct layouts ('=' = host byte order, no implicit alignment: every pad byte is written out) ---
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
# xfrm_selector (56): daddr saddr dport dport_mask sport sport_mask family prefixlen_d prefixlen_s proto . ifindex user
_SELECTOR = struct.Struct("=16s16s2s2s2s2sHBBB3xiI")
_XFRM_ID = struct.Struct("=16s4sB3x")  # 24: daddr spi(be) proto
_LIFETIME_CFG = struct.Struct("=8Q")  # 64
_LIFETIME_CUR = struct.Struct("=4Q")  # 32
_STATS = struct.Struct("=3I")  # 12
_USERSA_TAIL = struct.Struct("=IIHBBB7x")  # seq reqid family mode replay_window flags + pad to 224
_USERSA_ID = struct.Struct("=16s4sHBx")  # 24: daddr spi(be) family proto
_SPI_RANGE = struct.Struct("=II")  # xfrm_userspi_info min, max after the usersa_info
_POLICY_TAIL = struct.Struct("=IIBBBB4x")  # priority index dir action flags share + pad to 168
_POLICY_ID_TAIL = struct.Struct("=IB3x")  # index dir + pad to 64
# xfrm_user_tmpl (64): id(daddr spi proto) family saddr reqid mode share optional aalgos ealgos calgos
_USER_TMPL = struct.Struct("=16s4sB3xH2x16sIBBBxIII")
_ALGO_AEAD = struct.Struct("=64sII")  # name, key_len (bits), icv_len (bits), then the key
_ALGO = struct.Struct("=64sI")  # xfrm_algo: name, key_len (bits)
_REPLAY_ESN = struct.Struct("=6I")  # bmp_len oseq seq oseq_hi seq_hi replay_window, then bmp[bmp_len]
_REPLAY_LEGACY = struct.Struct("=3I")  # oseq seq bitmap
_MARK = struct.Struct("=II")
_OFFLOAD = struct.Struct("=iB3x")  # ifindex flags + pad to 8
_U8 = struct.Struct("=B")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_I32 = struct.Struct("=i")
_EXPIRE_TAIL = struct.Struct("=B7x")  # xfrm_user_expire.hard + pad to 232
_ACQUIRE_TAIL = struct.Struct("=4I")  # aalgos ealgos calgos seq

SELECTOR_LEN = _SELECTOR.size
USERSA_INFO_LEN = (
    _SELECTOR.size + _XFRM_ID.size + 16 + _LIFETIME_CFG.size + _LIFETIME_CUR.size + _STATS.size + _USERSA_TAIL.size
)
USERPOLICY_INFO_LEN = _SELECTOR.size + _LIFETIME_CFG.size + _LIFETIME_CUR.size + _POLICY_TAIL.size
USERPOLICY_ID_LEN = _SELECTOR.size + _POLICY_ID_TAIL.size
USERSPI_INFO_LEN = USERSA_INFO_LEN + _SPI_RANGE.size
USER_EXPIRE_LEN = USERSA_INFO_LEN + _EXPIRE_TAIL.size
USER_ACQUIRE_LEN = _XFRM_ID.size + 16 + _SELECTOR.size + USERPOLICY_INFO_LEN + _ACQUIRE_TAIL.size
USER_POLEXPIRE_LEN = USERPOLICY_INFO_LEN + _EXPIRE_TAIL.size
USERSA_ID_LEN = _USERSA_ID.size
USER_TMPL_LEN = _USER_TMPL.size
POLICY_TYPE_LEN = 6  # sizeof(struct xfrm_userpolicy_type) with its natural padding

# sizes the kernel checks (xfrm_msg_min / nla_policy); a mismatch here would make every request fail
assert USERSA_INFO_LEN == 224 and USERPOLICY_INFO_LEN == 168 and USERPOLICY_ID_LEN == 64
assert USERSPI_INFO_LEN == 232 and USER_EXPIRE_LEN == 232 and USER_ACQUIRE_LEN == 280 and USER_TMPL_LEN == 64


class XfrmDecodeError(ValueError):
    """Bytes from the kernel that do not parse as the message they claim to be."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


# ---------------------------------------------------------------------------------------------------------------
# addresses


def _family_of(addr: IPAddress | IPNetwork) -> int:
    return AF_INET if addr.version == 4 else AF_INET6


def _pack_addr(addr: IPAddress | None) -> bytes:
    # xfrm_address_t is a 16-byte union: IPv4 uses the first 4 bytes, the rest stays zero.
    if addr is None:
        return bytes(16)
    return addr.packed.ljust(16, b"\0")


def _unpack_addr(raw: bytes, family: int) -> IPAddress:
    if family == AF_INET:
        return IPv4Address(raw[:4])
    if family == AF_INET6:
        return IPv6Address(raw[:16])
    raise XfrmDecodeError(f"unknown address family {family}")


def _as_address(value: IPAddress | str) -> IPAddress:
    return value if isinstance(value, IPv4Address | IPv6Address) else ip_address(value)


def _as_network(value: IPNetwork | str) -> IPNetwork:
    return value if isinstance(value, IPv4Network | IPv6Network) else ip_network(value)


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{name} must be a 32-bit unsigned integer, got {value}")


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be a 64-bit unsigned integer, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True, slots=True)
class Selector:
    """struct xfrm_selector: which inner packets a policy or SA covers.

    `unspec=True` sends the wire family AF_UNSPEC, which the kernel matches against any family; the addresses
    are still carried (larval ALLOCSPI states have them).
    A port with a zero mask gets the full mask 0xffff, as iproute2 does.
    """

    src: IPNetwork
    dst: IPNetwork
    proto: int = 0
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    ifindex: int = 0
    user: int = 0
    unspec: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _as_network(self.src))
        object.__setattr__(self, "dst", _as_network(self.dst))
        if self.src.version != self.dst.version:
            raise ValueError(f"selector mixes address families: {self.src} -> {self.dst}")
        if not 0 <= self.proto <= 255:
            raise ValueError(f"selector proto must be 0..255, got {self.proto}")
        for name in ("sport", "sport_mask", "dport", "dport_mask"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"selector {name} must be 0..65535, got {getattr(self, name)}")
        if self.sport and not self.sport_mask:
            object.__setattr__(self, "sport_mask", 0xFFFF)
        if self.dport and not self.dport_mask:
            object.__setattr__(self, "dport_mask", 0xFFFF)
        _check_u32("selector user", self.user)

    @classmethod
    def of(cls, src: str | IPNetwork, dst: str | IPNetwork, **kwargs: Any) -> Selector:
        return cls(_as_network(src), _as_network(dst), **kwargs)

    @classmethod
    def any(cls) -> Selector:
        return cls(IPv4Network("0.0.0.0/0"), IPv4Network("0.0.0.0/0"), unspec=True)

    @property
    def family(self) -> int:
        return AF_UNSPEC if self.unspec else _family_of(self.src)


@dataclass(frozen=True, slots=True)
class Mark:
    """struct xfrm_mark: matches when (skb->mark & mask) == value."""

    value: int
    mask: int = U32_MAX

    def __post_init__(self) -> None:
        _check_u32("mark value", self.value)
        _check_u32("mark mask", self.mask)


@dataclass(frozen=True, slots=True)
class Offload:
    """struct xfrm_user_offload: hand an SA (crypto or packet mode) or a policy (packet mode) to a device."""

    ifindex: int
    flags: OffloadFlag

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", OffloadFlag(self.flags))
        if self.ifindex <= 0 or self.ifindex > 0x7FFF_FFFF:
            raise ValueError(f"offload ifindex must be a positive interface index, got {self.ifindex}")
        if self.flags & OffloadFlag.IPV6:
            raise ValueError("XFRM_OFFLOAD_IPV6 is a legacy flag with no kernel support; do not set it")

    @classmethod
    def crypto(cls, ifindex: int, inbound: bool) -> Offload:
        return cls(ifindex, OffloadFlag.INBOUND if inbound else OffloadFlag(0))

    @classmethod
    def packet(cls, ifindex: int, inbound: bool = False) -> Offload:
        return cls(ifindex, OffloadFlag.PACKET | (OffloadFlag.INBOUND if inbound else OffloadFlag(0)))

    @property
    def is_packet(self) -> bool:
        return bool(self.flags & OffloadFlag.PACKET)

    @property
    def inbound(self) -> bool:
        return bool(self.flags & OffloadFlag.INBOUND)


@dataclass(frozen=True, slots=True)
class Aead:
    """An rfc4106(gcm(aes)) key: AES key (16/24/32 bytes) + 4-byte salt; ICV in bits (64, 96 or 128)."""

    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    icv_bits: int = 128
    name: str = AEAD_RFC4106_GCM_AES

    def __post_init__(self) -> None:
        if self.name == AEAD_RFC4106_GCM_AES:
            if len(self.key) not in (16, 24, 32):
                raise ValueError(f"AES-GCM key must be 16, 24 or 32 bytes, got {len(self.key)}")
            if len(self.salt) != 4:
                raise ValueError(f"rfc4106 salt must be 4 bytes, got {len(self.salt)}")
            if self.icv_bits not in (64, 96, 128):
                raise ValueError(f"rfc4106 ICV must be 64, 96 or 128 bits, got {self.icv_bits}")
        if not self.name or len(self.name.encode()) >= XFRM_ALG_NAME_LEN:
            raise ValueError(f"algorithm name must be 1..{XFRM_ALG_NAME_LEN - 1} bytes")

    @property
    def key_bits(self) -> int:
        """What the kernel calls alg_key_len: the key *and* the salt, in bits."""
        return (len(self.key) + len(self.salt)) * 8


@dataclass(frozen=True, slots=True)
class Lifetime:
    """struct xfrm_lifetime_cfg. Byte/packet limits default to XFRM_INF, time limits to 0 (none)."""

    soft_bytes: int = XFRM_INF
    hard_bytes: int = XFRM_INF
    soft_packets: int = XFRM_INF
    hard_packets: int = XFRM_INF
    soft_add_seconds: int = 0
    hard_add_seconds: int = 0
    soft_use_seconds: int = 0
    hard_use_seconds: int = 0

    def __post_init__(self) -> None:
        # spelled out rather than dataclasses.fields(): this runs for every SA and policy of a dump
        values = (
            self.soft_bytes, self.hard_bytes, self.soft_packets, self.hard_packets,
            self.soft_add_seconds, self.hard_add_seconds, self.soft_use_seconds, self.hard_use_seconds,
        )  # fmt: skip
        if not all(0 <= v <= U64_MAX for v in values):
            raise ValueError(f"lifetime values must be 64-bit unsigned integers, got {values}")

    def pack(self) -> bytes:
        return _LIFETIME_CFG.pack(
            self.soft_bytes, self.hard_bytes, self.soft_packets, self.hard_packets,
            self.soft_add_seconds, self.hard_add_seconds, self.soft_use_seconds, self.hard_use_seconds,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> Lifetime:
        return cls(*_LIFETIME_CFG.unpack(raw))


@dataclass(frozen=True, slots=True)
class LifetimeCurrent:
    """struct xfrm_lifetime_cur: counters and times the kernel reports."""

    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0


@dataclass(frozen=True, slots=True)
class Stats:
    """struct xfrm_stats."""

    replay_window: int = 0
    replay: int = 0
    integrity_failed: int = 0


@dataclass(frozen=True, slots=True)
class ReplayState:
    """XFRMA_REPLAY_ESN_VAL, or the legacy XFRMA_REPLAY_VAL (`legacy`: one 32-bit bitmap, no *_hi)."""

    oseq: int
    seq: int
    oseq_hi: int = 0
    seq_hi: int = 0
    replay_window: int = 0
    bitmap: tuple[int, ...] = ()
    legacy: bool = False

    @property
    def bmp_len(self) -> int:
        return len(self.bitmap)


@dataclass(frozen=True, slots=True)
class SecurityAssociation:
    """One ESP state (xfrm_usersa_info plus attributes).

    `src`/`dst` are the outer (tunnel) addresses, `selector` the inner traffic. `replay_window` above 32, or
    `esn=True`, is sent as XFRMA_REPLAY_ESN_VAL (the kernel then wants usersa_info.replay_window == 0).
    `aead` is None only for states read back from the kernel that carry no AEAD (larval ALLOCSPI states,
    or SAs some other key manager installed with separate cipher/auth algorithms).
    """

    src: IPAddress
    dst: IPAddress
    spi: int
    aead: Aead | None
    selector: Selector
    reqid: int = 0
    mode: Mode = Mode.TUNNEL
    proto: int = IPPROTO_ESP
    replay_window: int = 0
    esn: bool = False
    lifetime: Lifetime = Lifetime()
    mark: Mark | None = None
    output_mark: Mark | None = None
    if_id: int = 0
    offload: Offload | None = None
    direction: SaDir | None = None
    flags: StateFlag = StateFlag(0)
    extra_flags: SaExtraFlag = SaExtraFlag(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _as_address(self.src))
        object.__setattr__(self, "dst", _as_address(self.dst))
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "flags", StateFlag(self.flags))
        object.__setattr__(self, "extra_flags", SaExtraFlag(self.extra_flags))
        if self.direction is not None:
            object.__setattr__(self, "direction", SaDir(self.direction))
        if self.src.version != self.dst.version:
            raise ValueError(f"SA endpoints mix address families: {self.src} -> {self.dst}")
        _check_u32("spi", self.spi)
        _check_u32("reqid", self.reqid)
        _check_u32("if_id", self.if_id)
        if self.proto not in (IPPROTO_ESP, IPPROTO_AH, IPPROTO_COMP):
            raise ValueError(f"SA proto must be ESP, AH or COMP, got {self.proto}")
        if self.flags & StateFlag.ESN:
            raise ValueError("set esn=True instead of StateFlag.ESN")
        if not 0 <= self.replay_window <= _ESN_MAX_WINDOW:
            raise ValueError(f"replay window must be 0..{_ESN_MAX_WINDOW}, got {self.replay_window}")

    @property
    def family(self) -> int:
        return _family_of(self.src)

    @property
    def uses_esn_attr(self) -> bool:
        return self.esn or self.replay_window > _LEGACY_MAX_WINDOW

    def id(self) -> SaId:
        return SaId(self.dst, self.spi, self.proto, mark=self.mark, src=self.src)

    def describe(self) -> str:
        return f"{_proto_name(self.proto)} spi 0x{self.spi:08x} {self.src} -> {self.dst} reqid {self.reqid}"


@dataclass(frozen=True, slots=True)
class SaInfo:
    """An SA as the kernel reports it: the configuration plus the kernel's counters."""

    sa: SecurityAssociation
    current: LifetimeCurrent = LifetimeCurrent()
    stats: Stats = Stats()
    seq: int = 0
    replay: ReplayState | None = None
    lastused: int | None = None
    algorithms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SaCounters:
    """What a dump of every SA is read for (idle checks, /config_dump, /metrics): which SA and its counters. Read
    from xfrm_usersa_info and XFRMA_MARK alone (`decode_sa_counters`): a whole SaInfo copies each SA's key and
    algorithms into objects, ~0.2 ms and some KiB per SA in UML, thousands of SAs at each idle check."""

    dst: IPAddress
    spi: int
    mark: Mark | None
    current: LifetimeCurrent

    @classmethod
    def of(cls, info: SaInfo) -> SaCounters:
        return cls(info.sa.dst, info.sa.spi, info.sa.mark, info.current)


@dataclass(frozen=True, slots=True)
class SaId:
    """struct xfrm_usersa_id (+ XFRMA_MARK, XFRMA_SRCADDR): names one SA for GETSA/DELSA."""

    dst: IPAddress
    spi: int
    proto: int = IPPROTO_ESP
    mark: Mark | None = None
    src: IPAddress | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dst", _as_address(self.dst))
        if self.src is not None:
            object.__setattr__(self, "src", _as_address(self.src))
        _check_u32("spi", self.spi)

    def describe(self) -> str:
        return f"{_proto_name(self.proto)} spi 0x{self.spi:08x} dst {self.dst}"


@dataclass(frozen=True, slots=True)
class SpiRequest:
    """XFRM_MSG_ALLOCSPI: reserve an unused SPI in [min_spi, max_spi] as a larval state.

    Install the real SA afterwards with `update_sa` (XFRM_MSG_UPDSA), which replaces the larval state.
    """

    src: IPAddress
    dst: IPAddress
    min_spi: int = 0x100
    max_spi: int = U32_MAX
    reqid: int = 0
    mode: Mode = Mode.TUNNEL
    proto: int = IPPROTO_ESP
    seq: int = 0
    mark: Mark | None = None
    if_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _as_address(self.src))
        object.__setattr__(self, "dst", _as_address(self.dst))
        if self.src.version != self.dst.version:
            raise ValueError(f"ALLOCSPI endpoints mix address families: {self.src} -> {self.dst}")
        _check_u32("min_spi", self.min_spi)
        _check_u32("max_spi", self.max_spi)
        if not 0 < self.min_spi <= self.max_spi:
            raise ValueError(f"SPI range must satisfy 0 < min <= max, got 0x{self.min_spi:x}..0x{self.max_spi:x}")


@dataclass(frozen=True, slots=True)
class Template:
    """struct xfrm_user_tmpl: what an IPsec policy needs; `src`/`dst` are the tunnel endpoints.

    reqid 0 matches an SA of any reqid (useful on in/fwd policies during a rekey).
    Endpoints may be None (transport mode): the kernel fills the family in from the policy selector.
    """

    src: IPAddress | None
    dst: IPAddress | None
    reqid: int = 0
    mode: Mode = Mode.TUNNEL
    proto: int = IPPROTO_ESP
    spi: int = 0
    share: Share = Share.ANY
    optional: bool = False
    aalgos: int = _ALL_ALGOS
    ealgos: int = _ALL_ALGOS
    calgos: int = _ALL_ALGOS

    def __post_init__(self) -> None:
        if self.src is not None:
            object.__setattr__(self, "src", _as_address(self.src))
        if self.dst is not None:
            object.__setattr__(self, "dst", _as_address(self.dst))
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "share", Share(self.share))
        if self.src is not None and self.dst is not None and self.src.version != self.dst.version:
            raise ValueError(f"template endpoints mix address families: {self.src} -> {self.dst}")
        for name in ("reqid", "spi", "aalgos", "ealgos", "calgos"):
            _check_u32(f"template {name}", getattr(self, name))

    @property
    def family(self) -> int:
        endpoint = self.dst if self.dst is not None else self.src
        return AF_UNSPEC if endpoint is None else _family_of(endpoint)


@dataclass(frozen=True, slots=True)
class Policy:
    """One security policy (xfrm_userpolicy_info + XFRMA_TMPL, MARK, IF_ID, OFFLOAD_DEV, POLICY_TYPE).

    A smaller `priority` wins. Policy offload exists only in packet mode (kernel >= 6.2).
    """

    selector: Selector
    direction: PolicyDir
    action: PolicyAction = PolicyAction.ALLOW
    priority: int = 0
    templates: tuple[Template, ...] = ()
    mark: Mark | None = None
    if_id: int = 0
    offload: Offload | None = None
    index: int = 0
    flags: PolicyFlag = PolicyFlag(0)
    share: Share = Share.ANY
    lifetime: Lifetime = Lifetime()
    ptype: PolicyType = PolicyType.MAIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", PolicyDir(self.direction))
        object.__setattr__(self, "action", PolicyAction(self.action))
        object.__setattr__(self, "flags", PolicyFlag(self.flags))
        object.__setattr__(self, "share", Share(self.share))
        object.__setattr__(self, "ptype", PolicyType(self.ptype))
        object.__setattr__(self, "templates", tuple(self.templates))
        _check_u32("priority", self.priority)
        _check_u32("index", self.index)
        _check_u32("if_id", self.if_id)
        if self.ptype == PolicyType.ANY:
            raise ValueError("policy type ANY is only valid in lookups")

    def id(self) -> PolicyId:
        return PolicyId(self.selector, self.direction, mark=self.mark, if_id=self.if_id, ptype=self.ptype)

    def describe(self) -> str:
        return f"policy {self.selector.src} -> {self.selector.dst} dir {self.direction.name.lower()}"


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """A policy as the kernel reports it (the index is the kernel's, in `policy.index`)."""

    policy: Policy
    current: LifetimeCurrent = LifetimeCurrent()


@dataclass(frozen=True, slots=True)
class PolicyId:
    """struct xfrm_userpolicy_id (+ MARK, IF_ID, POLICY_TYPE): names one policy by selector+dir, or by index."""

    selector: Selector | None
    direction: PolicyDir
    index: int = 0
    mark: Mark | None = None
    if_id: int = 0
    ptype: PolicyType = PolicyType.MAIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", PolicyDir(self.direction))
        if self.selector is None and not self.index:
            raise ValueError("a policy id needs a selector or a kernel index")
        _check_u32("index", self.index)
        _check_u32("if_id", self.if_id)

    def describe(self) -> str:
        if self.selector is None:
            return f"policy index {self.index} dir {self.direction.name.lower()}"
        return f"policy {self.selector.src} -> {self.selector.dst} dir {self.direction.name.lower()}"


# --- notifications ---


@dataclass(frozen=True, slots=True)
class Expire:
    """XFRM_MSG_EXPIRE: a soft limit was reached (rekey now) or a hard one (the SA is gone)."""

    sa: SaInfo
    hard: bool


@dataclass(frozen=True, slots=True)
class PolicyExpire:
    policy: PolicyInfo
    hard: bool


@dataclass(frozen=True, slots=True)
class Acquire:
    """XFRM_MSG_ACQUIRE: an outbound packet hit a policy whose template has no SA yet."""

    dst: IPAddress
    src: IPAddress
    proto: int
    spi: int
    selector: Selector
    policy: PolicyInfo
    templates: tuple[Template, ...]
    seq: int
    aalgos: int
    ealgos: int
    calgos: int


@dataclass(frozen=True, slots=True)
class SaEvent:
    """XFRMNLGRP_SA: NEWSA/UPDSA/DELSA notifications (for DELSA `sa` holds the deleted state)."""

    kind: XfrmMsg
    sa: SaInfo


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    """XFRMNLGRP_POLICY: NEWPOLICY/UPDPOLICY/DELPOLICY notifications."""

    kind: XfrmMsg
    policy: PolicyInfo


@dataclass(frozen=True, slots=True)
class FlushEvent:
    kind: XfrmMsg
    proto: int = IPSEC_PROTO_ANY


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    type: int
    payload: bytes = field(repr=False)


Event = SaEvent | PolicyEvent | FlushEvent | Expire | PolicyExpire | Acquire | UnknownEvent


# ---------------------------------------------------------------------------------------------------------------
# netlink framing


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes = field(repr=False)


def encode_nlmsg(msg_type: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    length = NLMSG_HDRLEN + len(payload)
    return _NLMSGHDR.pack(length, msg_type, flags, seq, pid) + payload + bytes(_align4(length) - length)


def decode_nlmsgs(data: bytes) -> list[NetlinkMessage]:
    """Split one netlink datagram into its messages."""
    out: list[NetlinkMessage] = []
    offset = 0
    while offset + NLMSG_HDRLEN <= len(data):
        length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < NLMSG_HDRLEN or offset + length > len(data):
            raise XfrmDecodeError(f"truncated netlink message: length {length} at offset {offset} of {len(data)}")
        out.append(NetlinkMessage(msg_type, flags, seq, pid, bytes(data[offset + NLMSG_HDRLEN : offset + length])))
        offset += _align4(length)
    if offset < len(data) and any(data[offset:]):
        raise XfrmDecodeError(f"{len(data) - offset} trailing bytes after the last netlink message")
    return out


def encode_attr(attr_type: int, payload: bytes) -> bytes:
    length = NLA_HDRLEN + len(payload)
    return _NLATTR.pack(length, attr_type) + payload + bytes(_align4(length) - length)


def iter_attrs(data: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + NLA_HDRLEN <= len(data):
        length, attr_type = _NLATTR.unpack_from(data, offset)
        if length < NLA_HDRLEN or offset + length > len(data):
            raise XfrmDecodeError(f"truncated netlink attribute: length {length} at offset {offset} of {len(data)}")
        # the top two bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER, not part of the type
        yield attr_type & 0x3FFF, bytes(data[offset + NLA_HDRLEN : offset + length])
        offset += _align4(length)


def decode_attrs(data: bytes) -> dict[int, bytes]:
    return dict(iter_attrs(data))


def _need(raw: bytes, size: int, what: str) -> None:
    if len(raw) < size:
        raise XfrmDecodeError(f"{what}: need {size} bytes, got {len(raw)}")


# ---------------------------------------------------------------------------------------------------------------
# acks and errors


@dataclass(frozen=True, slots=True)
class NetlinkAck:
    """NLMSG_ERROR (error 0 = ACK) or the status that ends a dump (NLMSG_DONE)."""

    error: int  # positive errno, 0 for success
    message: str | None = None  # the kernel's extended ack text, when it gave one
    offset: int | None = None  # byte offset of the offending attribute in our request
    missing_attr: int | None = None

    @property
    def ok(self) -> bool:
        return self.error == 0

    def describe(self) -> str:
        return errno_text(self.error, self.message)


def errno_text(err: int, kernel_message: str | None = None) -> str:
    name = errno_mod.errorcode.get(err, f"errno {err}")
    text = f"{os.strerror(err)} ({name})"
    return f"{text}: {kernel_message}" if kernel_message else text


def _parse_ack_tlvs(data: bytes) -> tuple[str | None, int | None, int | None]:
    message = offset = missing = None
    for attr_type, value in iter_attrs(data):
        if attr_type == NlmsgErrAttr.MSG:
            message = value.split(b"\0", 1)[0].decode("utf-8", "replace") or None
        elif attr_type == NlmsgErrAttr.OFFS and len(value) >= 4:
            offset = _U32.unpack_from(value)[0]
        elif attr_type == NlmsgErrAttr.MISS_TYPE and len(value) >= 4:
            missing = _U32.unpack_from(value)[0]
    return message, offset, missing


def decode_ack(msg: NetlinkMessage) -> NetlinkAck:
    """Decode NLMSG_ERROR: the error, then the echoed request (only its header when CAPPED), then ext-ack TLVs."""
    if msg.type != NlmsgType.ERROR:
        raise XfrmDecodeError(f"not an NLMSG_ERROR message (type {msg.type})")
    _need(msg.payload, 4 + NLMSG_HDRLEN, "nlmsgerr")
    err = -_I32.unpack_from(msg.payload)[0]
    if err < 0:
        raise XfrmDecodeError(f"nlmsgerr carries a positive error {-err}")
    message = offset = missing = None
    if msg.flags & NlmFlag.ACK_TLVS:
        echoed_len = _NLMSGHDR.unpack_from(msg.payload, 4)[0]
        start = 4 + (NLMSG_HDRLEN if msg.flags & NlmFlag.CAPPED else _align4(echoed_len))
        message, offset, missing = _parse_ack_tlvs(msg.payload[start:])
    return NetlinkAck(err, message, offset, missing)


def decode_done(msg: NetlinkMessage) -> NetlinkAck:
    """NLMSG_DONE ends a dump; its optional int is the dump's status (negative errno), TLVs may follow."""
    if msg.type != NlmsgType.DONE:
        raise XfrmDecodeError(f"not an NLMSG_DONE message (type {msg.type})")
    if len(msg.payload) < 4:
        return NetlinkAck(0)
    err = -_I32.unpack_from(msg.payload)[0]
    message = offset = missing = None
    if msg.flags & NlmFlag.ACK_TLVS:
        message, offset, missing = _parse_ack_tlvs(msg.payload[4:])
    return NetlinkAck(max(err, 0), message, offset, missing)


# ---------------------------------------------------------------------------------------------------------------
# requests


@dataclass(frozen=True, slots=True)
class Request:
    """One netlink request: type, flags and payload; `what` names it in errors.

    `payload` may hold key material, so it never appears in a repr.
    """

    type: XfrmMsg
    flags: int
    payload: bytes = field(repr=False)
    what: str
    hint: str | None = None  # appended to the error text when the kernel refuses the request

    @property
    def is_dump(self) -> bool:
        return (self.flags & NlmFlag.DUMP) == NlmFlag.DUMP

    def encode(self, seq: int, pid: int = 0, *, ack: bool = True) -> bytes:
        """`ack=False` drops NLM_F_ACK: the kernel then answers only a refusal (and any reply), not a success."""
        flags = self.flags if ack else self.flags & ~NlmFlag.ACK
        return encode_nlmsg(self.type, flags, seq, self.payload, pid)


_ACKED = NlmFlag.REQUEST | NlmFlag.ACK


def _pack_selector(sel: Selector) -> bytes:
    return _SELECTOR.pack(
        _pack_addr(sel.dst.network_address),
        _pack_addr(sel.src.network_address),
        sel.dport.to_bytes(2, "big"),
        sel.dport_mask.to_bytes(2, "big"),
        sel.sport.to_bytes(2, "big"),
        sel.sport_mask.to_bytes(2, "big"),
        sel.family,
        sel.dst.prefixlen,
        sel.src.prefixlen,
        sel.proto,
        sel.ifindex,
        sel.user,
    )


def _unpack_selector(raw: bytes, outer_family: int = AF_INET) -> Selector:
    """`outer_family` reads the addresses of an AF_UNSPEC selector (the SA's own family)."""
    _need(raw, _SELECTOR.size, "xfrm_selector")
    daddr, saddr, dport, dmask, sport, smask, family, plen_d, plen_s, proto, ifindex, user = _SELECTOR.unpack_from(raw)
    addr_family = family if family != AF_UNSPEC else (outer_family if outer_family != AF_UNSPEC else AF_INET)
    bits = 32 if addr_family == AF_INET else 128
    if addr_family not in (AF_INET, AF_INET6) or plen_d > bits or plen_s > bits:
        raise XfrmDecodeError(f"selector with family {family} and prefix lengths {plen_s}/{plen_d}")
    network = IPv4Network if addr_family == AF_INET else IPv6Network
    width = 4 if addr_family == AF_INET else 16
    # from integers: several times faster than from address objects, and this runs for every dumped object
    return Selector(
        src=network((int.from_bytes(saddr[:width], "big"), plen_s), strict=False),
        dst=network((int.from_bytes(daddr[:width], "big"), plen_d), strict=False),
        proto=proto,
        sport=int.from_bytes(sport, "big"),
        sport_mask=int.from_bytes(smask, "big"),
        dport=int.from_bytes(dport, "big"),
        dport_mask=int.from_bytes(dmask, "big"),
        ifindex=ifindex,
        user=user,
        unspec=family == AF_UNSPEC,
    )


def _pack_usersa_info(
    sel: Selector,
    dst: IPAddress,
    spi: int,
    proto: int,
    src: IPAddress,
    lifetime: Lifetime | None,
    reqid: int,
    mode: Mode,
    replay_window: int,
    flags: int,
    seq: int = 0,
) -> bytes:
    return b"".join(
        (
            _pack_selector(sel),
            _XFRM_ID.pack(_pack_addr(dst), spi.to_bytes(4, "big"), proto),
            _pack_addr(src),
            lifetime.pack() if lifetime is not None else bytes(_LIFETIME_CFG.size),
            bytes(_LIFETIME_CUR.size),
            bytes(_STATS.size),
            _USERSA_TAIL.pack(seq, reqid, _family_of(dst), mode, replay_window, flags),
        )
    )


def _mark_attr(attr: XfrmAttr, mark: Mark | None) -> bytes:
    return b"" if mark is None else encode_attr(attr, _MARK.pack(mark.value, mark.mask))


def _u32_attr(attr: XfrmAttr, value: int) -> bytes:
    return encode_attr(attr, _U32.pack(value))


def check_installable_sa(sa: SecurityAssociation) -> None:
    """Rules for SAs we install (the model itself also accepts what other key managers put in the kernel)."""
    if sa.aead is None:
        raise ValueError(f"{sa.describe()}: an SA to install needs an AEAD key")
    if sa.esn and sa.replay_window == 0 and sa.direction != SaDir.OUT:
        raise ValueError(f"{sa.describe()}: ESN needs a replay window of at least 1 (the kernel rejects 0)")
    if sa.offload is not None and sa.if_id:
        raise ValueError(f"{sa.describe()}: if_id cannot be combined with offload (the device decrypts first)")
    if sa.direction is not None and sa.offload is not None and sa.offload.inbound != (sa.direction == SaDir.IN):
        raise ValueError(f"{sa.describe()}: offload direction and SA direction disagree")


def encode_sa(sa: SecurityAssociation) -> bytes:
    """The NEWSA/UPDSA payload: xfrm_usersa_info followed by the attributes."""
    check_installable_sa(sa)
    assert sa.aead is not None  # checked above; narrows the type
    esn_attr = sa.uses_esn_attr
    info = _pack_usersa_info(
        sa.selector,
        sa.dst,
        sa.spi,
        sa.proto,
        sa.src,
        sa.lifetime,
        sa.reqid,
        sa.mode,
        0 if esn_attr else sa.replay_window,
        sa.flags | (StateFlag.ESN if sa.esn else 0),
    )
    parts = [info, encode_attr(XfrmAttr.ALG_AEAD, _pack_aead(sa.aead))]
    if esn_attr:
        words = (sa.replay_window + 31) // 32
        esn = _REPLAY_ESN.pack(words, 0, 0, 0, 0, sa.replay_window) + bytes(4 * words)
        parts.append(encode_attr(XfrmAttr.REPLAY_ESN_VAL, esn))
    parts.append(_mark_attr(XfrmAttr.MARK, sa.mark))
    if sa.output_mark is not None:
        parts.append(_u32_attr(XfrmAttr.SET_MARK, sa.output_mark.value))
        parts.append(_u32_attr(XfrmAttr.SET_MARK_MASK, sa.output_mark.mask))
    if sa.if_id:
        parts.append(_u32_attr(XfrmAttr.IF_ID, sa.if_id))
    if sa.offload is not None:
        parts.append(encode_attr(XfrmAttr.OFFLOAD_DEV, _OFFLOAD.pack(sa.offload.ifindex, sa.offload.flags)))
    if sa.extra_flags:
        parts.append(_u32_attr(XfrmAttr.SA_EXTRA_FLAGS, sa.extra_flags))
    if sa.direction is not None:
        parts.append(encode_attr(XfrmAttr.SA_DIR, _U8.pack(sa.direction)))
    return b"".join(parts)


def _pack_aead(aead: Aead) -> bytes:
    material = aead.key + aead.salt
    return _ALGO_AEAD.pack(aead.name.encode(), aead.key_bits, aead.icv_bits) + material


def _offload_hint(offload: Offload | None) -> str | None:
    if offload is None or not offload.is_packet:
        return None
    return (
        f"packet offload was requested on ifindex {offload.ifindex}: the device must support it (kernel >= 6.2, "
        "xfrmdev_ops with policy offload); there is no software fallback in packet mode"
    )


def new_sa(sa: SecurityAssociation, *, update: bool = False) -> Request:
    """XFRM_MSG_NEWSA (fails with EEXIST on a duplicate) or XFRM_MSG_UPDSA (replaces, e.g. a larval state)."""
    kind = XfrmMsg.UPDSA if update else XfrmMsg.NEWSA
    return Request(kind, _ACKED, encode_sa(sa), f"{kind.name} {sa.describe()}", _offload_hint(sa.offload))


def _sa_id_payload(sa_id: SaId) -> bytes:
    parts = [
        _USERSA_ID.pack(_pack_addr(sa_id.dst), sa_id.spi.to_bytes(4, "big"), _family_of(sa_id.dst), sa_id.proto),
        _mark_attr(XfrmAttr.MARK, sa_id.mark),
    ]
    if sa_id.src is not None:
        parts.append(encode_attr(XfrmAttr.SRCADDR, _pack_addr(sa_id.src)))
    return b"".join(parts)


def delete_sa(sa_id: SaId) -> Request:
    return Request(XfrmMsg.DELSA, _ACKED, _sa_id_payload(sa_id), f"DELSA {sa_id.describe()}")


def get_sa(sa_id: SaId) -> Request:
    """The reply is one NEWSA message (decode with decode_sa)."""
    return Request(XfrmMsg.GETSA, _ACKED, _sa_id_payload(sa_id), f"GETSA {sa_id.describe()}")


def dump_sa() -> Request:
    return Request(XfrmMsg.GETSA, NlmFlag.REQUEST | NlmFlag.DUMP, b"", "GETSA dump")


def alloc_spi(req: SpiRequest) -> Request:
    """The reply is one NEWSA message describing the larval state (decode with decode_sa)."""
    info = _pack_usersa_info(
        Selector.any(), req.dst, 0, req.proto, req.src, None, req.reqid, req.mode, 0, 0, seq=req.seq
    )
    parts = [info, _SPI_RANGE.pack(req.min_spi, req.max_spi), _mark_attr(XfrmAttr.MARK, req.mark)]
    if req.if_id:
        parts.append(_u32_attr(XfrmAttr.IF_ID, req.if_id))
    what = f"ALLOCSPI {_proto_name(req.proto)} {req.src} -> {req.dst} range 0x{req.min_spi:x}..0x{req.max_spi:x}"
    return Request(XfrmMsg.ALLOCSPI, _ACKED, b"".join(parts), what)


def _pack_policy_info(policy: Policy) -> bytes:
    return b"".join(
        (
            _pack_selector(policy.selector),
            policy.lifetime.pack(),
            bytes(_LIFETIME_CUR.size),
            _POLICY_TAIL.pack(
                policy.priority, policy.index, policy.direction, policy.action, policy.flags, policy.share
            ),
        )
    )


def _pack_template(t: Template) -> bytes:
    return _USER_TMPL.pack(
        _pack_addr(t.dst),
        t.spi.to_bytes(4, "big"),
        t.proto,
        t.family,
        _pack_addr(t.src),
        t.reqid,
        t.mode,
        t.share,
        int(t.optional),
        t.aalgos,
        t.ealgos,
        t.calgos,
    )


def _policy_type_attr(ptype: PolicyType) -> bytes:
    # struct xfrm_userpolicy_type: u8 type, pad, u16 reserved1, u8 reserved2, pad -- only the first byte is set
    return encode_attr(XfrmAttr.POLICY_TYPE, bytes((ptype,)) + bytes(POLICY_TYPE_LEN - 1))


def check_installable_policy(policy: Policy) -> None:
    if policy.offload is not None:
        if policy.offload.flags != OffloadFlag.PACKET:
            raise ValueError(f"{policy.describe()}: policy offload exists only in packet mode (flags = PACKET)")
        if policy.if_id:
            raise ValueError(f"{policy.describe()}: if_id cannot be combined with offload")
    if policy.action == PolicyAction.BLOCK and policy.templates:
        raise ValueError(f"{policy.describe()}: a block policy takes no templates")


def encode_policy(policy: Policy) -> bytes:
    check_installable_policy(policy)
    parts = [_pack_policy_info(policy)]
    if policy.templates:
        parts.append(encode_attr(XfrmAttr.TMPL, b"".join(_pack_template(t) for t in policy.templates)))
    parts.append(_mark_attr(XfrmAttr.MARK, policy.mark))
    if policy.if_id:
        parts.append(_u32_attr(XfrmAttr.IF_ID, policy.if_id))
    if policy.offload is not None:
        parts.append(encode_attr(XfrmAttr.OFFLOAD_DEV, _OFFLOAD.pack(policy.offload.ifindex, policy.offload.flags)))
    if policy.ptype != PolicyType.MAIN:
        parts.append(_policy_type_attr(policy.ptype))
    return b"".join(parts)


def new_policy(policy: Policy, *, update: bool = False) -> Request:
    """XFRM_MSG_NEWPOLICY (EEXIST on a duplicate) or XFRM_MSG_UPDPOLICY (insert or replace)."""
    kind = XfrmMsg.UPDPOLICY if update else XfrmMsg.NEWPOLICY
    what = f"{kind.name} {policy.describe()}"
    return Request(kind, _ACKED, encode_policy(policy), what, _offload_hint(policy.offload))


def _policy_id_payload(pid: PolicyId) -> bytes:
    sel = _pack_selector(pid.selector) if pid.selector is not None else bytes(_SELECTOR.size)
    parts = [sel, _POLICY_ID_TAIL.pack(pid.index, pid.direction), _mark_attr(XfrmAttr.MARK, pid.mark)]
    if pid.if_id:
        parts.append(_u32_attr(XfrmAttr.IF_ID, pid.if_id))
    if pid.ptype != PolicyType.MAIN:
        parts.append(_policy_type_attr(pid.ptype))
    return b"".join(parts)


def delete_policy(pid: PolicyId) -> Request:
    return Request(XfrmMsg.DELPOLICY, _ACKED, _policy_id_payload(pid), f"DELPOLICY {pid.describe()}")


def get_policy(pid: PolicyId) -> Request:
    """The reply is one NEWPOLICY message (decode with decode_policy)."""
    return Request(XfrmMsg.GETPOLICY, _ACKED, _policy_id_payload(pid), f"GETPOLICY {pid.describe()}")


def dump_policy() -> Request:
    return Request(XfrmMsg.GETPOLICY, NlmFlag.REQUEST | NlmFlag.DUMP, b"", "GETPOLICY dump")


def flush_sa(proto: int = IPSEC_PROTO_ANY) -> Request:
    return Request(XfrmMsg.FLUSHSA, _ACKED, _U8.pack(proto), f"FLUSHSA {_proto_name(proto)}")


def flush_policy(ptype: PolicyType = PolicyType.MAIN) -> Request:
    payload = b"" if ptype == PolicyType.MAIN else _policy_type_attr(ptype)
    return Request(XfrmMsg.FLUSHPOLICY, _ACKED, payload, "FLUSHPOLICY")


# ---------------------------------------------------------------------------------------------------------------
# decoding


def _proto_name(proto: int) -> str:
    return {IPPROTO_ESP: "esp", IPPROTO_AH: "ah", IPPROTO_COMP: "comp", IPSEC_PROTO_ANY: "any"}.get(proto, str(proto))


def _alg_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _decode_aead(raw: bytes) -> Aead:
    _need(raw, _ALGO_AEAD.size, "xfrm_algo_aead")
    name_raw, key_bits, icv_bits = _ALGO_AEAD.unpack_from(raw)
    name = _alg_name(name_raw)
    material = raw[_ALGO_AEAD.size : _ALGO_AEAD.size + (key_bits + 7) // 8]
    if len(material) * 8 != key_bits:
        raise XfrmDecodeError(f"AEAD {name}: key length {key_bits} bits but {len(material)} bytes present")
    if name == AEAD_RFC4106_GCM_AES:
        if len(material) < 5:
            raise XfrmDecodeError(f"AEAD {name}: key material too short ({len(material)} bytes)")
        return Aead(material[:-4], material[-4:], icv_bits, name)
    return Aead(material, b"", icv_bits, name)


def _decode_replay_esn(raw: bytes) -> ReplayState:
    _need(raw, _REPLAY_ESN.size, "xfrm_replay_state_esn")
    bmp_len, oseq, seq, oseq_hi, seq_hi, window = _REPLAY_ESN.unpack_from(raw)
    _need(raw, _REPLAY_ESN.size + 4 * bmp_len, "xfrm_replay_state_esn bitmap")
    bitmap = struct.unpack_from(f"={bmp_len}I", raw, _REPLAY_ESN.size)
    return ReplayState(oseq, seq, oseq_hi, seq_hi, window, tuple(bitmap))


def _mark_from(attrs: Mapping[int, bytes], attr: XfrmAttr) -> Mark | None:
    raw = attrs.get(attr)
    if raw is None:
        return None
    _need(raw, _MARK.size, "xfrm_mark")
    return Mark(*_MARK.unpack_from(raw))


def _u32_from(attrs: Mapping[int, bytes], attr: XfrmAttr) -> int | None:
    raw = attrs.get(attr)
    if raw is None:
        return None
    _need(raw, 4, attr.name)
    return int(_U32.unpack_from(raw)[0])


def _offload_from(attrs: Mapping[int, bytes]) -> Offload | None:
    raw = attrs.get(XfrmAttr.OFFLOAD_DEV)
    if raw is None:
        return None
    _need(raw, _OFFLOAD.size - 3, "xfrm_user_offload")
    ifindex, flags = struct.unpack_from("=iB", raw)
    return Offload(ifindex, OffloadFlag(flags))


def _sa_from(info: bytes, attrs: Mapping[int, bytes]) -> SaInfo:
    _need(info, USERSA_INFO_LEN, "xfrm_usersa_info")
    seq, reqid, family, mode, replay_window, flags = _USERSA_TAIL.unpack_from(info, USERSA_INFO_LEN - _USERSA_TAIL.size)
    sel = _unpack_selector(info, family)
    off = _SELECTOR.size
    daddr, spi, proto = _XFRM_ID.unpack_from(info, off)
    off += _XFRM_ID.size
    saddr = info[off : off + 16]
    off += 16
    lifetime = Lifetime.unpack(info[off : off + _LIFETIME_CFG.size])
    off += _LIFETIME_CFG.size
    current = LifetimeCurrent(*_LIFETIME_CUR.unpack_from(info, off))
    off += _LIFETIME_CUR.size
    stats = Stats(*_STATS.unpack_from(info, off))

    aead = _decode_aead(attrs[XfrmAttr.ALG_AEAD]) if XfrmAttr.ALG_AEAD in attrs else None
    algorithms = tuple(
        _alg_name(attrs[a][:XFRM_ALG_NAME_LEN])
        for a in (XfrmAttr.ALG_AEAD, XfrmAttr.ALG_CRYPT, XfrmAttr.ALG_AUTH, XfrmAttr.ALG_AUTH_TRUNC, XfrmAttr.ALG_COMP)
        if a in attrs
    )
    replay: ReplayState | None = None
    window = replay_window
    if XfrmAttr.REPLAY_ESN_VAL in attrs:
        replay = _decode_replay_esn(attrs[XfrmAttr.REPLAY_ESN_VAL])
        window = replay.replay_window
    elif XfrmAttr.REPLAY_VAL in attrs:
        raw = attrs[XfrmAttr.REPLAY_VAL]
        _need(raw, _REPLAY_LEGACY.size, "xfrm_replay_state")
        oseq, rseq, bitmap = _REPLAY_LEGACY.unpack_from(raw)
        replay = ReplayState(oseq, rseq, replay_window=replay_window, bitmap=(bitmap,), legacy=True)
    output_value = _u32_from(attrs, XfrmAttr.SET_MARK)
    output_mask = _u32_from(attrs, XfrmAttr.SET_MARK_MASK)
    output_mark = None if output_value is None else Mark(output_value, U32_MAX if output_mask is None else output_mask)
    direction_raw = attrs.get(XfrmAttr.SA_DIR)
    lastused_raw = attrs.get(XfrmAttr.LASTUSED)
    try:
        sa = SecurityAssociation(
            src=_unpack_addr(saddr, family),
            dst=_unpack_addr(daddr, family),
            spi=int.from_bytes(spi, "big"),
            aead=aead,
            selector=sel,
            reqid=reqid,
            mode=Mode(mode),
            proto=proto,
            replay_window=window,
            esn=bool(flags & StateFlag.ESN),
            lifetime=lifetime,
            mark=_mark_from(attrs, XfrmAttr.MARK),
            output_mark=output_mark,
            if_id=_u32_from(attrs, XfrmAttr.IF_ID) or 0,
            offload=_offload_from(attrs),
            direction=SaDir(direction_raw[0]) if direction_raw else None,
            flags=StateFlag(flags & ~StateFlag.ESN),
            extra_flags=SaExtraFlag(_u32_from(attrs, XfrmAttr.SA_EXTRA_FLAGS) or 0),
        )
    except ValueError as exc:
        raise XfrmDecodeError(f"kernel SA does not fit the model: {exc}") from exc
    return SaInfo(
        sa=sa,
        current=current,
        stats=stats,
        seq=seq,
        replay=replay,
        lastused=_U64.unpack_from(lastused_raw)[0] if lastused_raw and len(lastused_raw) >= 8 else None,
        algorithms=algorithms,
    )


def decode_sa(payload: bytes) -> SaInfo:
    """NEWSA/UPDSA payload (dump entries, GETSA and ALLOCSPI replies, notifications)."""
    _need(payload, USERSA_INFO_LEN, "xfrm_usersa_info")
    return _sa_from(payload[:USERSA_INFO_LEN], decode_attrs(payload[USERSA_INFO_LEN:]))


def decode_sa_counters(payload: bytes) -> SaCounters:
    """A NEWSA payload's destination, SPI, mark and counters, nothing else (the same values `decode_sa` gives)."""
    _need(payload, USERSA_INFO_LEN, "xfrm_usersa_info")
    family = _USERSA_TAIL.unpack_from(payload, USERSA_INFO_LEN - _USERSA_TAIL.size)[2]
    off = _SELECTOR.size
    daddr, spi, _proto = _XFRM_ID.unpack_from(payload, off)
    off += _XFRM_ID.size + 16 + _LIFETIME_CFG.size
    current = LifetimeCurrent(*_LIFETIME_CUR.unpack_from(payload, off))
    marks = {a: raw for a, raw in iter_attrs(memoryview(payload)[USERSA_INFO_LEN:]) if a == XfrmAttr.MARK}
    mark = _mark_from(marks, XfrmAttr.MARK)
    return SaCounters(_unpack_addr(daddr, family), int.from_bytes(spi, "big"), mark, current)


def decode_sa_id(payload: bytes) -> SaId:
    _need(payload, USERSA_ID_LEN, "xfrm_usersa_id")
    daddr, spi, family, proto = _USERSA_ID.unpack_from(payload)
    attrs = decode_attrs(payload[USERSA_ID_LEN:])
    src_raw = attrs.get(XfrmAttr.SRCADDR)
    return SaId(
        _unpack_addr(daddr, family),
        int.from_bytes(spi, "big"),
        proto,
        mark=_mark_from(attrs, XfrmAttr.MARK),
        src=_unpack_addr(src_raw, family) if src_raw else None,
    )


def _decode_templates(raw: bytes) -> tuple[Template, ...]:
    if len(raw) % USER_TMPL_LEN:
        raise XfrmDecodeError(f"XFRMA_TMPL length {len(raw)} is not a multiple of {USER_TMPL_LEN}")
    out = []
    for off in range(0, len(raw), USER_TMPL_LEN):
        daddr, spi, proto, family, saddr, reqid, mode, share, optional, aalgos, ealgos, calgos = _USER_TMPL.unpack_from(
            raw, off
        )
        src = _unpack_addr(saddr, family) if family and any(saddr) else None
        dst = _unpack_addr(daddr, family) if family and any(daddr) else None
        out.append(
            Template(
                src, dst, reqid, Mode(mode), proto, int.from_bytes(spi, "big"), Share(share), bool(optional),
                aalgos, ealgos, calgos,
            )
        )  # fmt: skip
    return tuple(out)


def _policy_from(info: bytes, attrs: Mapping[int, bytes]) -> PolicyInfo:
    _need(info, USERPOLICY_INFO_LEN, "xfrm_userpolicy_info")
    sel = _unpack_selector(info)
    off = _SELECTOR.size
    lifetime = Lifetime.unpack(info[off : off + _LIFETIME_CFG.size])
    off += _LIFETIME_CFG.size
    current = LifetimeCurrent(*_LIFETIME_CUR.unpack_from(info, off))
    off += _LIFETIME_CUR.size
    priority, index, direction, action, flags, share = _POLICY_TAIL.unpack_from(info, off)
    ptype_raw = attrs.get(XfrmAttr.POLICY_TYPE)
    try:
        policy = Policy(
            selector=sel,
            direction=PolicyDir(direction),
            action=PolicyAction(action),
            priority=priority,
            templates=_decode_templates(attrs.get(XfrmAttr.TMPL, b"")),
            mark=_mark_from(attrs, XfrmAttr.MARK),
            if_id=_u32_from(attrs, XfrmAttr.IF_ID) or 0,
            offload=_offload_from(attrs),
            index=index,
            flags=PolicyFlag(flags),
            share=Share(share),
            lifetime=lifetime,
            ptype=PolicyType(ptype_raw[0]) if ptype_raw else PolicyType.MAIN,
        )
    except ValueError as exc:
        raise XfrmDecodeError(f"kernel policy does not fit the model: {exc}") from exc
    return PolicyInfo(policy, current)


def decode_policy(payload: bytes) -> PolicyInfo:
    """NEWPOLICY/UPDPOLICY payload (dump entries, GETPOLICY replies, notifications)."""
    _need(payload, USERPOLICY_INFO_LEN, "xfrm_userpolicy_info")
    return _policy_from(payload[:USERPOLICY_INFO_LEN], decode_attrs(payload[USERPOLICY_INFO_LEN:]))


def decode_expire(payload: bytes) -> Expire:
    _need(payload, USER_EXPIRE_LEN - 7, "xfrm_user_expire")
    hard = payload[USERSA_INFO_LEN]
    return Expire(_sa_from(payload[:USERSA_INFO_LEN], decode_attrs(payload[USER_EXPIRE_LEN:])), bool(hard))


def decode_polexpire(payload: bytes) -> PolicyExpire:
    _need(payload, USER_POLEXPIRE_LEN - 7, "xfrm_user_polexpire")
    hard = payload[USERPOLICY_INFO_LEN]
    info = _policy_from(payload[:USERPOLICY_INFO_LEN], decode_attrs(payload[USER_POLEXPIRE_LEN:]))
    return PolicyExpire(info, bool(hard))


def decode_acquire(payload: bytes) -> Acquire:
    _need(payload, USER_ACQUIRE_LEN, "xfrm_user_acquire")
    daddr, spi, proto = _XFRM_ID.unpack_from(payload)
    off = _XFRM_ID.size
    saddr = payload[off : off + 16]
    off += 16
    sel = _unpack_selector(payload[off : off + _SELECTOR.size])
    off += _SELECTOR.size
    attrs = decode_attrs(payload[USER_ACQUIRE_LEN:])
    policy = _policy_from(payload[off : off + USERPOLICY_INFO_LEN], attrs)
    off += USERPOLICY_INFO_LEN
    aalgos, ealgos, calgos, seq = _ACQUIRE_TAIL.unpack_from(payload, off)
    templates = policy.policy.templates
    # the outer family is the first template's; xfrm_id carries no family of its own
    family = templates[0].family if templates and templates[0].family else sel.family or AF_INET
    return Acquire(
        dst=_unpack_addr(daddr, family),
        src=_unpack_addr(saddr, family),
        proto=proto,
        spi=int.from_bytes(spi, "big"),
        selector=sel,
        policy=policy,
        templates=templates,
        seq=seq,
        aalgos=aalgos,
        ealgos=ealgos,
        calgos=calgos,
    )


def decode_event(msg: NetlinkMessage) -> Event:
    """Decode one multicast notification. Unknown types come back as UnknownEvent, never as an error."""
    t = msg.type
    p = msg.payload
    if t in (XfrmMsg.NEWSA, XfrmMsg.UPDSA):
        return SaEvent(XfrmMsg(t), decode_sa(p))
    if t == XfrmMsg.DELSA:
        # xfrm_usersa_id, then XFRMA_SA holding the whole state, then the state's other attributes
        _need(p, USERSA_ID_LEN, "xfrm_usersa_id")
        attrs = decode_attrs(p[USERSA_ID_LEN:])
        if XfrmAttr.SA not in attrs:
            raise XfrmDecodeError("DELSA notification without XFRMA_SA")
        return SaEvent(XfrmMsg.DELSA, _sa_from(attrs[XfrmAttr.SA], attrs))
    if t in (XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY):
        return PolicyEvent(XfrmMsg(t), decode_policy(p))
    if t == XfrmMsg.DELPOLICY:
        _need(p, USERPOLICY_ID_LEN, "xfrm_userpolicy_id")
        attrs = decode_attrs(p[USERPOLICY_ID_LEN:])
        if XfrmAttr.POLICY not in attrs:
            raise XfrmDecodeError("DELPOLICY notification without XFRMA_POLICY")
        return PolicyEvent(XfrmMsg.DELPOLICY, _policy_from(attrs[XfrmAttr.POLICY], attrs))
    if t == XfrmMsg.EXPIRE:
        return decode_expire(p)
    if t == XfrmMsg.POLEXPIRE:
        return decode_polexpire(p)
    if t == XfrmMsg.ACQUIRE:
        return decode_acquire(p)
    if t == XfrmMsg.FLUSHSA:
        return FlushEvent(XfrmMsg.FLUSHSA, p[0] if p else IPSEC_PROTO_ANY)
    if t == XfrmMsg.FLUSHPOLICY:
        return FlushEvent(XfrmMsg.FLUSHPOLICY)
    return UnknownEvent(t, p)


def decode_sas(messages: Iterable[NetlinkMessage]) -> list[SaInfo]:
    return [decode_sa(m.payload) for m in messages if m.type in (XfrmMsg.NEWSA, XfrmMsg.UPDSA)]


def decode_sas_counters(messages: Iterable[NetlinkMessage]) -> list[SaCounters]:
    return [decode_sa_counters(m.payload) for m in messages if m.type in (XfrmMsg.NEWSA, XfrmMsg.UPDSA)]


def decode_policies(messages: Iterable[NetlinkMessage]) -> list[PolicyInfo]:
    return [decode_policy(m.payload) for m in messages if m.type in (XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY)]


def new_sas(sas: Sequence[SecurityAssociation], *, update: bool = False) -> list[Request]:
    return [new_sa(sa, update=update) for sa in sas]
