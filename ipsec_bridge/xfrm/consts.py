"""Netlink and XFRM constants, as defined by the Linux uapi headers.

Sources: include/uapi/linux/xfrm.h (message types, attribute ids, flags, modes, offload flags, groups),
include/uapi/linux/netlink.h (nlmsghdr flags, control messages, extended-ack attributes, socket options).
Values are written out by hand from those headers; tests/unit/test_xfrm_consts.py pins every one of them,
because hand-copied XFRM constants in public code are often wrong (e.g. the offload flags).
"""

from __future__ import annotations

import enum

# --- sockets (include/uapi/linux/netlink.h, linux/socket.h) ---
AF_NETLINK = 16
NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

AF_UNSPEC = 0
AF_INET = 2
AF_INET6 = 10
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108
IPSEC_PROTO_ANY = 255

# --- nlmsghdr ---
NLMSG_HDRLEN = 16
NLA_HDRLEN = 4


class NlmsgType(enum.IntEnum):
    NOOP = 1
    ERROR = 2
    DONE = 3
    OVERRUN = 4


class NlmFlag(enum.IntFlag):
    REQUEST = 0x01
    MULTI = 0x02
    ACK = 0x04
    ECHO = 0x08
    DUMP_INTR = 0x10
    DUMP_FILTERED = 0x20
    # GET requests
    ROOT = 0x100
    MATCH = 0x200
    ATOMIC = 0x400
    DUMP = 0x300
    # NEW requests (same bits as ROOT/MATCH/ATOMIC, meaning depends on the request kind)
    REPLACE = 0x100
    EXCL = 0x200
    CREATE = 0x400
    APPEND = 0x800
    # NLMSG_ERROR acks
    CAPPED = 0x100
    ACK_TLVS = 0x200


class NlmsgErrAttr(enum.IntEnum):
    UNUSED = 0
    MSG = 1
    OFFS = 2
    COOKIE = 3
    POLICY = 4
    MISS_TYPE = 5
    MISS_NEST = 6


# --- xfrm.h: message types ---
class XfrmMsg(enum.IntEnum):
    NEWSA = 0x10
    DELSA = 0x11
    GETSA = 0x12
    NEWPOLICY = 0x13
    DELPOLICY = 0x14
    GETPOLICY = 0x15
    ALLOCSPI = 0x16
    ACQUIRE = 0x17
    EXPIRE = 0x18
    UPDPOLICY = 0x19
    UPDSA = 0x1A
    POLEXPIRE = 0x1B
    FLUSHSA = 0x1C
    FLUSHPOLICY = 0x1D
    NEWAE = 0x1E
    GETAE = 0x1F
    REPORT = 0x20
    MIGRATE = 0x21
    NEWSADINFO = 0x22
    GETSADINFO = 0x23
    NEWSPDINFO = 0x24
    GETSPDINFO = 0x25
    MAPPING = 0x26
    SETDEFAULT = 0x27
    GETDEFAULT = 0x28


# --- xfrm.h: enum xfrm_attr_type_t ---
class XfrmAttr(enum.IntEnum):
    UNSPEC = 0
    ALG_AUTH = 1
    ALG_CRYPT = 2
    ALG_COMP = 3
    ENCAP = 4
    TMPL = 5
    SA = 6
    POLICY = 7
    SEC_CTX = 8
    LTIME_VAL = 9
    REPLAY_VAL = 10
    REPLAY_THRESH = 11
    ETIMER_THRESH = 12
    SRCADDR = 13
    COADDR = 14
    LASTUSED = 15
    POLICY_TYPE = 16
    MIGRATE = 17
    ALG_AEAD = 18
    KMADDRESS = 19
    ALG_AUTH_TRUNC = 20
    MARK = 21
    TFCPAD = 22
    REPLAY_ESN_VAL = 23
    SA_EXTRA_FLAGS = 24
    PROTO = 25
    ADDRESS_FILTER = 26
    PAD = 27
    OFFLOAD_DEV = 28
    SET_MARK = 29  # a.k.a. XFRMA_OUTPUT_MARK
    SET_MARK_MASK = 30
    IF_ID = 31
    MTIMER_THRESH = 32
    SA_DIR = 33  # Linux >= 6.10; older kernels ignore it silently
    NAT_KEEPALIVE_INTERVAL = 34
    SA_PCPU = 35


# --- xfrm.h: modes, directions, actions, flags ---
class Mode(enum.IntEnum):
    TRANSPORT = 0
    TUNNEL = 1
    ROUTEOPTIMIZATION = 2
    IN_TRIGGER = 3
    BEET = 4
    IPTFS = 5


class PolicyDir(enum.IntEnum):
    IN = 0
    OUT = 1
    FWD = 2


class PolicyAction(enum.IntEnum):
    ALLOW = 0
    BLOCK = 1


class PolicyType(enum.IntEnum):
    MAIN = 0
    SUB = 1
    ANY = 255


class SaDir(enum.IntEnum):
    IN = 1
    OUT = 2


class Share(enum.IntEnum):
    ANY = 0
    SESSION = 1
    USER = 2
    UNIQUE = 3


class StateFlag(enum.IntFlag):
    """xfrm_usersa_info.flags (u8)."""

    NOECN = 1
    DECAP_DSCP = 2
    NOPMTUDISC = 4
    WILDRECV = 8
    ICMP = 16
    AF_UNSPEC = 32
    ALIGN4 = 64
    ESN = 128


class SaExtraFlag(enum.IntFlag):
    """XFRMA_SA_EXTRA_FLAGS (u32)."""

    DONT_ENCAP_DSCP = 1
    OSEQ_MAY_WRAP = 2


class PolicyFlag(enum.IntFlag):
    """xfrm_userpolicy_info.flags (u8)."""

    LOCALOK = 1
    ICMP = 2


class OffloadFlag(enum.IntFlag):
    """xfrm_user_offload.flags. IPV6 is a legacy bit with no kernel code behind it; never set it."""

    IPV6 = 1
    INBOUND = 2
    PACKET = 4  # Linux >= 6.2


class UserPolicyDefault(enum.IntEnum):
    UNSPEC = 0
    BLOCK = 1
    ACCEPT = 2


class XfrmGroup(enum.IntEnum):
    """enum xfrm_nlgroups: numbers for NETLINK_ADD_MEMBERSHIP (not the legacy XFRMGRP_* bind() bitmask)."""

    ACQUIRE = 1
    EXPIRE = 2
    SA = 3
    POLICY = 4
    AEVENTS = 5
    REPORT = 6
    MIGRATE = 7
    MAPPING = 8


XFRM_INF = 0xFFFF_FFFF_FFFF_FFFF
XFRMA_REPLAY_ESN_MAX = 4096  # the kernel allows bmp_len <= 4096 / 32 words, i.e. a window of at most 4096 packets
AEAD_RFC4106_GCM_AES = "rfc4106(gcm(aes))"
XFRM_ALG_NAME_LEN = 64
