"""Every XFRM/netlink constant we use, pinned to include/uapi/linux/xfrm.h and netlink.h.

Written out again here, independently of ipsec_bridge/xfrm/consts.py: public code carries wrong hand-copied
values (XFRM_OFFLOAD_PACKET 2, XFRMA_OFFLOAD_DEV 26 ...), so a slip on either side fails this test.
"""

from __future__ import annotations

from ipsec_bridge.xfrm import consts as c

UAPI_MESSAGES = {
    "NEWSA": 0x10, "DELSA": 0x11, "GETSA": 0x12, "NEWPOLICY": 0x13, "DELPOLICY": 0x14, "GETPOLICY": 0x15,
    "ALLOCSPI": 0x16, "ACQUIRE": 0x17, "EXPIRE": 0x18, "UPDPOLICY": 0x19, "UPDSA": 0x1A, "POLEXPIRE": 0x1B,
    "FLUSHSA": 0x1C, "FLUSHPOLICY": 0x1D, "NEWAE": 0x1E, "GETAE": 0x1F, "REPORT": 0x20, "MIGRATE": 0x21,
    "NEWSADINFO": 0x22, "GETSADINFO": 0x23, "NEWSPDINFO": 0x24, "GETSPDINFO": 0x25, "MAPPING": 0x26,
    "SETDEFAULT": 0x27, "GETDEFAULT": 0x28,
}  # fmt: skip
UAPI_ATTRS = [
    "UNSPEC", "ALG_AUTH", "ALG_CRYPT", "ALG_COMP", "ENCAP", "TMPL", "SA", "POLICY", "SEC_CTX", "LTIME_VAL",
    "REPLAY_VAL", "REPLAY_THRESH", "ETIMER_THRESH", "SRCADDR", "COADDR", "LASTUSED", "POLICY_TYPE", "MIGRATE",
    "ALG_AEAD", "KMADDRESS", "ALG_AUTH_TRUNC", "MARK", "TFCPAD", "REPLAY_ESN_VAL", "SA_EXTRA_FLAGS", "PROTO",
    "ADDRESS_FILTER", "PAD", "OFFLOAD_DEV", "SET_MARK", "SET_MARK_MASK", "IF_ID", "MTIMER_THRESH", "SA_DIR",
    "NAT_KEEPALIVE_INTERVAL", "SA_PCPU",
]  # fmt: skip


def test_message_types() -> None:
    assert {k.name: k.value for k in c.XfrmMsg} == UAPI_MESSAGES


def test_attribute_ids_follow_the_enum_order() -> None:
    assert [a.name for a in sorted(c.XfrmAttr)] == UAPI_ATTRS
    assert [a.value for a in sorted(c.XfrmAttr)] == list(range(len(UAPI_ATTRS)))
    assert (c.XfrmAttr.OFFLOAD_DEV, c.XfrmAttr.SET_MARK, c.XfrmAttr.IF_ID, c.XfrmAttr.SA_DIR) == (28, 29, 31, 33)


def test_flags_modes_directions() -> None:
    assert (c.OffloadFlag.IPV6, c.OffloadFlag.INBOUND, c.OffloadFlag.PACKET) == (1, 2, 4)
    assert (c.Mode.TRANSPORT, c.Mode.TUNNEL, c.Mode.BEET, c.Mode.IPTFS) == (0, 1, 4, 5)
    assert (c.PolicyDir.IN, c.PolicyDir.OUT, c.PolicyDir.FWD) == (0, 1, 2)
    assert (c.PolicyAction.ALLOW, c.PolicyAction.BLOCK) == (0, 1)
    assert (c.SaDir.IN, c.SaDir.OUT) == (1, 2)
    assert (int(c.StateFlag.ESN), int(c.StateFlag.AF_UNSPEC)) == (128, 32)
    assert (c.SaExtraFlag.DONT_ENCAP_DSCP, c.SaExtraFlag.OSEQ_MAY_WRAP) == (1, 2)
    assert (c.PolicyFlag.LOCALOK, c.PolicyFlag.ICMP) == (1, 2)
    assert (c.PolicyType.MAIN, c.PolicyType.SUB, c.PolicyType.ANY) == (0, 1, 255)
    assert c.XFRM_INF == 2**64 - 1 and c.XFRMA_REPLAY_ESN_MAX == 4096


def test_multicast_groups_are_group_numbers_not_the_legacy_bitmask() -> None:
    assert [(g.name, g.value) for g in c.XfrmGroup] == [
        ("ACQUIRE", 1), ("EXPIRE", 2), ("SA", 3), ("POLICY", 4), ("AEVENTS", 5), ("REPORT", 6), ("MIGRATE", 7),
        ("MAPPING", 8),
    ]  # fmt: skip


def test_netlink_constants() -> None:
    assert (c.AF_NETLINK, c.NETLINK_XFRM, c.SOL_NETLINK) == (16, 6, 270)
    assert (c.NETLINK_ADD_MEMBERSHIP, c.NETLINK_CAP_ACK, c.NETLINK_EXT_ACK) == (1, 10, 11)
    assert (c.NlmsgType.NOOP, c.NlmsgType.ERROR, c.NlmsgType.DONE, c.NlmsgType.OVERRUN) == (1, 2, 3, 4)
    assert (c.NlmFlag.REQUEST, c.NlmFlag.MULTI, c.NlmFlag.ACK, c.NlmFlag.DUMP_INTR) == (1, 2, 4, 0x10)
    assert (c.NlmFlag.DUMP, c.NlmFlag.CAPPED, c.NlmFlag.ACK_TLVS) == (0x300, 0x100, 0x200)
    assert (c.NlmsgErrAttr.MSG, c.NlmsgErrAttr.OFFS, c.NlmsgErrAttr.MISS_TYPE) == (1, 2, 5)
    assert (c.AF_INET, c.AF_INET6, c.IPPROTO_ESP, c.IPSEC_PROTO_ANY) == (2, 10, 50, 255)
