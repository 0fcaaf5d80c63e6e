"""Golden bytes for every XFRM message kind we send or read, written by hand from include/uapi/linux/xfrm.h.

The expected bytes below are NOT produced by our encoder: each one is spelled out field by field from the
x86_64 struct layouts (xfrm_selector 56, xfrm_id 24, xfrm_usersa_info 224, xfrm_userpolicy_info 168,
xfrm_user_tmpl 64, xfrm_usersa_id 24, xfrm_userpolicy_id 64, xfrm_userspi_info 232, xfrm_user_expire 232,
xfrm_user_acquire 280), little-endian host integers, network-order SPIs and ports, 4-byte attribute alignment.
Then every model round-trips through encode/decode. The same encoder is checked against a real 6.1 kernel and
`ip xfrm` in tests/kernel/test_xfrm_kernel.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import (
    XFRM_INF,
    Mode,
    NlmFlag,
    OffloadFlag,
    PolicyAction,
    PolicyDir,
    PolicyType,
    SaDir,
    SaExtraFlag,
    XfrmMsg,
)
from tests.support.xfrm_samples import (
    AEAD_NAME,
    CURLFT_ZERO,
    KEY16,
    KEY32,
    LFT_DEFAULT,
    SA_V4_INFO,
    SALT,
    SEL_V4,
    SEL_V6,
    STATS_ZERO,
    Z4,
    Z12,
    Z16,
    hx,
    kernel_sa_v4_payload,
    policy_v4,
    sa_v4,
)

# --- more building blocks (hex, hand-written); the shared ones are in tests/support/xfrm_samples.py ------------

SA_V4_ATTRS = f"""
  6000 1200 {AEAD_NAME} a0000000 80000000     # XFRMA_ALG_AEAD len 96: name, key_len 160 bits, icv 128
  000102030405060708090a0b0c0d0e0f a1a2a3a4   #   AES-128 key + 4-byte salt
  2c00 1700 04000000 {Z4} {Z4} {Z4} {Z4} 80000000 {Z16}   # XFRMA_REPLAY_ESN_VAL: bmp_len 4 ... window 128, bitmap
  0c00 1500 10000000 ff000000                 # XFRMA_MARK 0x10/0xff
  0800 1d00 000d0000                          # XFRMA_SET_MARK 0xd00
  0800 1e00 000f0000                          # XFRMA_SET_MARK_MASK 0xf00
"""
NEWSA_V4 = f"""
  98010000 1000 0500 01000000 00000000        # nlmsghdr: len 408, XFRM_MSG_NEWSA, REQUEST|ACK, seq 1, pid 0
  {SA_V4_INFO}
  {SA_V4_ATTRS}
"""


def sa_v6() -> m.SecurityAssociation:
    return m.SecurityAssociation(
        src=ip_address("2001:db8::1"),
        dst=ip_address("2001:db8::2"),
        spi=0xC0DE0002,
        aead=m.Aead(KEY32, SALT),
        selector=m.Selector.of("fd00:0:1::/64", "fd00:0:2::/64"),
        reqid=0x102,
        replay_window=32,
        if_id=9,
        direction=SaDir.IN,
    )


NEWSA_V6 = f"""
  70010000 1a00 0500 02000000 00000000        # len 368, XFRM_MSG_UPDSA, REQUEST|ACK, seq 2
  {SEL_V6}
  20010db8000000000000000000000002 c0de0002 32 000000   # id: daddr 2001:db8::2, spi 0xc0de0002, ESP
  20010db8000000000000000000000001                       # saddr 2001:db8::1
  {LFT_DEFAULT} {CURLFT_ZERO} {STATS_ZERO}
  00000000 02010000                           # seq, reqid 0x102
  0a00 01 20 00                               # AF_INET6, tunnel, replay_window 32 (legacy, no ESN attr), no flags
  00000000000000
  7000 1200 {AEAD_NAME} 20010000 80000000     # XFRMA_ALG_AEAD len 112: key_len 288 bits, icv 128
  202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f a1a2a3a4
  0800 1f00 09000000                          # XFRMA_IF_ID 9
  0500 2100 01 000000                         # XFRMA_SA_DIR in (u8, padded)
"""


# --- SA requests --------------------------------------------------------------------------------------------------


def test_newsa_ipv4_aes128_esn_marks_lifetimes_golden() -> None:
    assert m.new_sa(sa_v4()).encode(seq=1) == hx(NEWSA_V4)


def test_updsa_ipv6_aes256_if_id_dir_golden() -> None:
    assert m.new_sa(sa_v6(), update=True).encode(seq=2) == hx(NEWSA_V6)


def test_sa_with_crypto_offload_and_extra_flags_golden() -> None:
    sa = dataclasses.replace(
        sa_v4(),
        mark=None,
        output_mark=None,
        replay_window=16,
        esn=False,
        offload=m.Offload.crypto(3, inbound=True),
        extra_flags=SaExtraFlag.DONT_ENCAP_DSCP,
    )
    payload = m.new_sa(sa).payload
    info = hx(SA_V4_INFO)
    info = info[:215] + bytes([16, 0]) + info[217:]  # replay_window 16 in the struct, no ESN flag
    expected = info + hx(f"""
      6000 1200 {AEAD_NAME} a0000000 80000000 000102030405060708090a0b0c0d0e0f a1a2a3a4
      0c00 1c00 03000000 02 000000      # XFRMA_OFFLOAD_DEV: ifindex 3, flags INBOUND, pad
      0800 1800 01000000                # XFRMA_SA_EXTRA_FLAGS DONT_ENCAP_DSCP
    """)
    assert payload == expected


def test_packet_offload_flags_are_the_uapi_ones() -> None:
    sa = dataclasses.replace(sa_v4(), offload=m.Offload.packet(7, inbound=False), direction=SaDir.OUT)
    payload = m.new_sa(sa).payload
    assert hx("0c00 1c00 07000000 04 000000") in payload  # PACKET = 4, not 2 (a common hand-copy mistake)
    assert hx("0500 2100 02 000000") in payload  # XFRMA_SA_DIR = 33, out = 2


def test_delsa_getsa_golden() -> None:
    sa_id = m.SaId(ip_address("192.0.2.2"), 0x1001, mark=m.Mark(0x10, 0xFF))
    body = f"""
      c0000202 {Z12} 00001001 0200 32 00      # xfrm_usersa_id: daddr, spi, family AF_INET, proto ESP, pad
      0c00 1500 10000000 ff000000             # XFRMA_MARK
    """
    assert m.delete_sa(sa_id).encode(seq=5) == hx(f"34000000 1100 0500 05000000 00000000 {body}")
    assert m.get_sa(sa_id).encode(seq=6) == hx(f"34000000 1200 0500 06000000 00000000 {body}")


def test_delsa_ipv6_with_srcaddr_golden() -> None:
    sa_id = m.SaId(ip_address("2001:db8::2"), 0xC0DE0002, src=ip_address("2001:db8::1"))
    assert m.delete_sa(sa_id).payload == hx("""
      20010db8000000000000000000000002 c0de0002 0a00 32 00
      1400 0d00 20010db8000000000000000000000001       # XFRMA_SRCADDR
    """)


def test_dump_requests_golden() -> None:
    assert m.dump_sa().encode(seq=9) == hx("10000000 1200 0103 09000000 00000000")  # GETSA, REQUEST|DUMP(0x300)
    assert m.dump_policy().encode(seq=9) == hx("10000000 1500 0103 09000000 00000000")
    assert m.dump_sa().is_dump and not m.get_sa(m.SaId(ip_address("10.0.0.1"), 1)).is_dump


def test_allocspi_golden() -> None:
    req = m.SpiRequest(
        ip_address("192.0.2.1"), ip_address("192.0.2.2"), 0x10000, 0x1FFFF, reqid=3, seq=44, mark=m.Mark(1)
    )
    expected = f"""
      04010000 1600 0500 03000000 00000000     # len 260, XFRM_MSG_ALLOCSPI
      {Z16} {Z16} 0000 0000 0000 0000 0000 00 00 00 000000 {Z4} {Z4}   # selector: AF_UNSPEC, all zero
      c0000202 {Z12} 00000000 32 000000       # id: daddr, spi 0 (the kernel picks), ESP
      c0000201 {Z12}                          # saddr
      {"00" * 64} {CURLFT_ZERO} {STATS_ZERO}  # lifetimes are not used by ALLOCSPI
      2c000000 03000000 0200 01 00 00 00000000000000   # seq 44, reqid 3, AF_INET, tunnel
      00000100 ffff0100                       # min 0x10000, max 0x1ffff (host order)
      0c00 1500 01000000 ffffffff             # XFRMA_MARK 1/0xffffffff
    """
    assert m.alloc_spi(req).encode(seq=3) == hx(expected)


def test_flush_golden() -> None:
    # nlmsg_len 17 (header + the one-byte proto ANY), then padding to 4
    assert m.flush_sa().encode(seq=1) == hx("11000000 1c00 0500 01000000 00000000 ff000000")
    assert m.flush_policy().encode(seq=1) == hx("10000000 1d00 0500 01000000 00000000")
    # XFRMA_POLICY_TYPE: len 10 (struct xfrm_userpolicy_type is 6 bytes: type, pad, u16, u8, pad), padded to 12
    assert m.flush_policy(PolicyType.SUB).payload == hx("0a00 1000 01 00 0000 00 00 0000")
    sub = dataclasses.replace(policy_v4(), ptype=PolicyType.SUB)
    assert m.encode_policy(sub).endswith(hx("0a00 1000 01 00 0000 00 00 0000"))
    assert m.decode_policy(m.encode_policy(sub)).policy == sub


# --- policies -----------------------------------------------------------------------------------------------------

TMPL_V4 = f"""
  c0000202 {Z12} 00000000 32 000000     # id: daddr (tunnel dst), spi 0, ESP
  0200 0000                             # family AF_INET, pad
  c0000201 {Z12}                        # saddr (tunnel src)
  07000000 01 00 00 00                  # reqid 7, mode tunnel, share any, optional 0, pad
  ffffffff ffffffff ffffffff            # aalgos ealgos calgos: any
"""


def test_newpolicy_ipv4_golden() -> None:
    expected = f"""
      08010000 1300 0500 04000000 00000000    # len 264, XFRM_MSG_NEWPOLICY
      {SEL_V4}
      {LFT_DEFAULT} {CURLFT_ZERO}
      64000000 00000000 01 00 00 00 00000000  # priority 100, index 0, dir out, allow, flags, share, pad to 168
      4400 0500 {TMPL_V4}                     # XFRMA_TMPL len 68: one xfrm_user_tmpl
      0c00 1500 10000000 ff000000             # XFRMA_MARK
    """
    assert m.new_policy(policy_v4()).encode(seq=4) == hx(expected)


def test_updpolicy_ipv6_block_with_if_id_and_packet_offload_golden() -> None:
    policy = m.Policy(
        selector=m.Selector.of("fd00:0:1::/64", "fd00:0:2::/64", proto=6, dport=443),
        direction=PolicyDir.FWD,
        action=PolicyAction.BLOCK,
        priority=1000,
        offload=m.Offload.packet(4),
    )
    sel = hx(SEL_V6)
    sel = sel[:32] + hx("01bb ffff") + sel[36:44] + bytes([6]) + sel[45:]  # dport 443/0xffff, proto TCP
    expected = sel + hx(f"""
      {LFT_DEFAULT} {CURLFT_ZERO}
      e8030000 00000000 02 01 00 00 00000000  # priority 1000, dir fwd, action block
      0c00 1c00 04000000 04 000000            # XFRMA_OFFLOAD_DEV ifindex 4, PACKET
    """)
    assert m.new_policy(policy, update=True).payload == expected
    assert m.new_policy(policy, update=True).type == XfrmMsg.UPDPOLICY


def test_delpolicy_getpolicy_golden() -> None:
    pid = policy_v4().id()
    body = f"""
      {SEL_V4}
      00000000 01 000000                       # index 0, dir out, pad to 64
      0c00 1500 10000000 ff000000
    """
    assert m.delete_policy(pid).encode(seq=8) == hx(f"5c000000 1400 0500 08000000 00000000 {body}")
    assert m.get_policy(pid).encode(seq=8) == hx(f"5c000000 1500 0500 08000000 00000000 {body}")
    by_index = m.PolicyId(None, PolicyDir.IN, index=0x29)
    assert m.delete_policy(by_index).payload == bytes(56) + hx("29000000 00 000000")


# --- decoding: what the kernel sends --------------------------------------------------------------------------------


def test_decode_kernel_sa_dump_entry() -> None:
    info = m.decode_sa(kernel_sa_v4_payload())
    assert info.sa == sa_v4()
    assert info.current == m.LifetimeCurrent(bytes=64, packets=2, add_time=10000, use_time=10016)
    assert info.stats == m.Stats(128, 1, 2)
    assert info.replay == m.ReplayState(oseq=5, seq=7, replay_window=128, bitmap=(0x7F, 0, 0, 0))
    assert info.lastused == 12345
    assert info.algorithms == ("rfc4106(gcm(aes))",)


def test_counters_read_from_a_dump_entry_are_what_the_whole_decode_gives() -> None:
    """The idle checks, /config_dump and /metrics read only destination, SPI, mark and counters of each SA."""
    entry = kernel_sa_v4_payload()
    assert m.decode_sa_counters(entry) == m.SaCounters.of(m.decode_sa(entry))
    assert m.decode_sa_counters(entry).current.bytes == 64 and m.decode_sa_counters(entry).mark == m.Mark(16, 255)
    sel = m.Selector.of("fd00::/64", "fd01::/64")
    v6 = m.SecurityAssociation("2001:db8::1", "2001:db8::2", 0x2345, m.Aead(KEY16, SALT), sel)
    unmarked = m.decode_sa_counters(m.encode_sa(v6))
    assert unmarked == m.SaCounters(ip_address("2001:db8::2"), 0x2345, None, m.LifetimeCurrent())
    part = m.encode_nlmsg(XfrmMsg.NEWSA, NlmFlag.MULTI, 77, entry, pid=1234)
    assert len(m.decode_sas_counters(m.decode_nlmsgs(part + part))) == 2
    with pytest.raises(m.XfrmDecodeError):
        m.decode_sa_counters(entry[:100])


def test_decode_multipart_dump_and_done() -> None:
    entry = kernel_sa_v4_payload()
    part = m.encode_nlmsg(XfrmMsg.NEWSA, NlmFlag.MULTI, 77, entry, pid=1234)
    done = hx("14000000 0300 0200 4d000000 d2040000 00000000")  # NLMSG_DONE, MULTI, seq 77, status 0
    messages = m.decode_nlmsgs(part + part + done)
    assert [msg.type for msg in messages] == [XfrmMsg.NEWSA, XfrmMsg.NEWSA, 3]
    assert len(m.decode_sas(messages)) == 2
    assert m.decode_done(messages[2]).ok


def test_decode_error_ack_with_extack() -> None:
    # NLMSG_ERROR, flags CAPPED|ACK_TLVS: error -EINVAL, our header echoed, then NLMSGERR_ATTR_MSG and _OFFS
    raw = hx("""
      58000000 0200 0003 01000000 d2040000       # len 88
      eaffffff                                   # error -22
      98010000 1000 0500 01000000 00000000       # the request's header (payload capped)
      2a00 0100 556e7265636f676e697a656420666c61677320696e206f66666c6f61642072657175657374 00 0000  # MSG, NUL, pad
      0800 0200 44010000                         # OFFS 324
    """)
    (msg,) = m.decode_nlmsgs(raw)
    ack = m.decode_ack(msg)
    assert (ack.error, ack.message, ack.offset) == (22, "Unrecognized flags in offload request", 324)
    assert ack.describe() == "Invalid argument (EINVAL): Unrecognized flags in offload request"


def test_decode_plain_ack_and_uncapped_error() -> None:
    ok = hx("24000000 0200 0001 07000000 d2040000 00000000 10000000 1200 0103 07000000 00000000")
    assert m.decode_ack(m.decode_nlmsgs(ok)[0]) == m.NetlinkAck(0)
    # without CAP_ACK the whole request is echoed before the TLVs
    uncapped = hx("""
      30000000 0200 0002 07000000 d2040000 fdffffff
      14000000 1c00 0500 07000000 00000000 ff000000
      0800 0100 6e6f0000
    """)
    ack = m.decode_ack(m.decode_nlmsgs(uncapped)[0])
    assert (ack.error, ack.message) == (3, "no")


def test_decode_expire_golden() -> None:
    payload = hx(SA_V4_INFO) + hx("01 00000000000000") + hx("0c00 1500 10000000 ff000000")  # hard=1, pad, MARK
    expire = m.decode_event(m.NetlinkMessage(XfrmMsg.EXPIRE, 0, 0, 0, payload))
    assert isinstance(expire, m.Expire)
    assert expire.hard
    assert expire.sa.sa.spi == 0x1001 and expire.sa.sa.mark == m.Mark(0x10, 0xFF) and expire.sa.sa.aead is None


def test_decode_acquire_golden() -> None:
    payload = hx(f"""
      c0000202 {Z12} 00000000 32 000000              # id: daddr, spi 0, ESP
      c0000201 {Z12}                                 # saddr
      0a02000a {Z12} 0a01000a {Z12} 0000ffff 0000 0000   # sel daddr 10.2.0.10, saddr 10.1.0.10, dport 0/ffff
      0200 20 20 01 000000 {Z4} {Z4}                      #     AF_INET /32 /32 icmp
      {SEL_V4} {LFT_DEFAULT} {CURLFT_ZERO} 64000000 08000000 01 00 00 00 00000000   # the policy (index 8)
      ffffffff ffffffff ffffffff 2a000000            # aalgos ealgos calgos, seq 42
      4400 0500 {TMPL_V4}
    """)
    acq = m.decode_event(m.NetlinkMessage(XfrmMsg.ACQUIRE, 0, 0, 0, payload))
    assert isinstance(acq, m.Acquire)
    assert (acq.src, acq.dst, acq.seq, acq.proto) == (ip_address("192.0.2.1"), ip_address("192.0.2.2"), 42, 50)
    assert acq.selector.src == IPv4Network("10.1.0.10/32") and acq.selector.proto == 1
    assert acq.selector.dport == 0 and acq.selector.dport_mask == 0xFFFF
    assert acq.policy.policy.index == 8 and acq.templates == policy_v4().templates


def test_decode_delsa_notification() -> None:
    payload = hx(f"c0000202 {Z12} 00001001 0200 32 00") + m.encode_attr(6, kernel_sa_v4_payload()[:224])
    payload += hx("0c00 1500 10000000 ff000000")
    event = m.decode_event(m.NetlinkMessage(XfrmMsg.DELSA, 0, 0, 0, payload))
    assert isinstance(event, m.SaEvent) and event.kind == XfrmMsg.DELSA
    assert event.sa.sa.spi == 0x1001 and event.sa.sa.mark == m.Mark(0x10, 0xFF)


def test_decode_delpolicy_and_flush_notifications() -> None:
    policy_payload = m.encode_policy(policy_v4())
    body = hx(f"{SEL_V4} 00000000 01 000000") + m.encode_attr(7, policy_payload[:168]) + policy_payload[168:]
    event = m.decode_event(m.NetlinkMessage(XfrmMsg.DELPOLICY, 0, 0, 0, body))
    assert isinstance(event, m.PolicyEvent) and event.policy.policy == policy_v4()
    flush = m.decode_event(m.NetlinkMessage(XfrmMsg.FLUSHSA, 0, 0, 0, hx("32000000")))
    assert flush == m.FlushEvent(XfrmMsg.FLUSHSA, 50)
    assert isinstance(m.decode_event(m.NetlinkMessage(0x99, 0, 0, 0, b"x")), m.UnknownEvent)


# --- round trips ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [sa_v4, sa_v6])
def test_sa_round_trip(make: object) -> None:
    sa = make()  # type: ignore[operator]
    assert m.decode_sa(m.encode_sa(sa)).sa == sa


def test_policy_round_trip_ipv4_ipv6() -> None:
    v6 = m.Policy(
        m.Selector.of("fd00:0:1::/64", "fd00:0:2::/64"),
        PolicyDir.IN,
        templates=(m.Template(ip_address("2001:db8::2"), ip_address("2001:db8::1"), reqid=0),),
        if_id=3,
    )
    for policy in (policy_v4(), v6):
        assert m.decode_policy(m.encode_policy(policy)).policy == policy


addresses_v4: st.SearchStrategy[IPv4Address | IPv6Address] = st.integers(0, 2**32 - 1).map(IPv4Address)
addresses_v6: st.SearchStrategy[IPv4Address | IPv6Address] = st.integers(0, 2**128 - 1).map(IPv6Address)
prefix_v4: st.SearchStrategy[IPv4Network | IPv6Network] = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
prefix_v6: st.SearchStrategy[IPv4Network | IPv6Network] = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
marks = st.none() | st.builds(m.Mark, u32, u32)


@st.composite
def security_associations(draw: st.DrawFn) -> m.SecurityAssociation:
    v6 = draw(st.booleans())
    addr = addresses_v6 if v6 else addresses_v4
    sel_prefix = prefix_v6 if draw(st.booleans()) else prefix_v4
    esn = draw(st.booleans())
    offload = draw(st.none() | st.builds(m.Offload, st.integers(1, 2**31 - 1), st.sampled_from([0, 2, 4, 6])))
    return m.SecurityAssociation(
        src=draw(addr),
        dst=draw(addr),
        spi=draw(u32),
        aead=m.Aead(
            draw(st.binary(min_size=16, max_size=16) | st.binary(min_size=32, max_size=32)),
            draw(st.binary(min_size=4, max_size=4)),
            draw(st.sampled_from([64, 96, 128])),
        ),
        selector=m.Selector(
            draw(sel_prefix),
            draw(sel_prefix),
            proto=draw(st.integers(0, 255)),
            sport=draw(st.integers(0, 0xFFFF)),
            sport_mask=draw(st.integers(1, 0xFFFF)),
            dport=draw(st.integers(0, 0xFFFF)),
            dport_mask=draw(st.integers(1, 0xFFFF)),
            ifindex=draw(st.integers(0, 2**31 - 1)),
            user=draw(u32),
        ),
        reqid=draw(u32),
        mode=draw(st.sampled_from([Mode.TUNNEL, Mode.TRANSPORT, Mode.BEET])),
        replay_window=draw(st.integers(1 if esn else 0, 4096)),
        esn=esn,
        lifetime=m.Lifetime(*[draw(u64) for _ in range(8)]),
        mark=draw(marks),
        output_mark=draw(marks),
        if_id=0 if offload else draw(u32),
        offload=offload,
        direction=draw(st.none() | st.sampled_from(list(SaDir))) if offload is None else None,
        extra_flags=SaExtraFlag(draw(st.integers(0, 3))),
    )


@settings(max_examples=150, deadline=None)
@given(security_associations())
def test_sa_round_trip_property(sa: m.SecurityAssociation) -> None:
    payload = m.encode_sa(sa)
    assert len(payload) % 4 == 0
    assert m.decode_sa(payload).sa == sa


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_decoders_reject_garbage_cleanly(data: bytes) -> None:
    decoders: list[Callable[[bytes], object]] = [
        m.decode_sa, m.decode_policy, m.decode_expire, m.decode_acquire, m.decode_sa_id, m.decode_nlmsgs,
    ]  # fmt: skip
    for decode in decoders:
        with contextlib.suppress(m.XfrmDecodeError):  # any other exception fails the test
            decode(data)


# --- validation and secrecy ---------------------------------------------------------------------------------------


def test_keys_never_in_reprs() -> None:
    sa = sa_v4()
    request = m.new_sa(sa)
    info = m.decode_sa(m.encode_sa(sa))
    for text in (repr(sa), repr(request), repr(info), str(request), repr(sa.aead)):
        assert KEY16.hex() not in text and "a1a2a3a4" not in text and "\\x00\\x01\\x02" not in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aead": m.Aead(KEY16, SALT)}, None),
        ({"esn": True, "replay_window": 0}, "replay window of at least 1"),
        ({"if_id": 4, "offload": m.Offload.crypto(2, False)}, "if_id cannot be combined with offload"),
        ({"direction": SaDir.IN, "offload": m.Offload.crypto(2, False)}, "offload direction and SA direction"),
        ({"aead": None}, "needs an AEAD key"),
    ],
)
def test_install_rules(change: dict[str, object], message: str | None) -> None:
    sa = dataclasses.replace(sa_v4(), **change)  # type: ignore[arg-type]
    if message is None:
        m.encode_sa(sa)
        return
    with pytest.raises(ValueError, match=message):
        m.new_sa(sa)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: m.Aead(bytes(15), SALT), "16, 24 or 32 bytes"),
        (lambda: m.Aead(KEY16, b"abc"), "salt must be 4 bytes"),
        (lambda: m.Aead(KEY16, SALT, icv_bits=100), "ICV must be"),
        (lambda: m.Selector.of("10.0.0.0/8", "fd00::/8"), "mixes address families"),
        (lambda: m.SpiRequest(ip_address("10.0.0.1"), ip_address("10.0.0.2"), 5, 4), "SPI range"),
        (lambda: m.Offload(0, OffloadFlag(0)), "positive interface index"),
        (lambda: m.Offload(3, OffloadFlag.IPV6), "legacy flag"),
        (lambda: m.Mark(2**32), "32-bit"),
        (lambda: dataclasses.replace(sa_v4(), replay_window=4097), "replay window must be"),
        (lambda: m.PolicyId(None, PolicyDir.IN), "selector or a kernel index"),
        (
            lambda: m.new_policy(dataclasses.replace(policy_v4(), offload=m.Offload.crypto(2, False))),
            "only in packet mode",
        ),
        (
            lambda: m.new_policy(dataclasses.replace(policy_v4(), action=PolicyAction.BLOCK)),
            "block policy takes no templates",
        ),
    ],
)
def test_bad_input_is_a_clear_value_error(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_lifetime_defaults_are_infinite() -> None:
    assert m.Lifetime().pack() == hx(LFT_DEFAULT)
    assert m.Lifetime().hard_bytes == XFRM_INF


def test_offload_hint_only_for_packet_mode() -> None:
    packet = dataclasses.replace(sa_v4(), offload=m.Offload.packet(5))
    crypto = dataclasses.replace(sa_v4(), offload=m.Offload.crypto(5, False))
    assert "no software fallback" in (m.new_sa(packet).hint or "")
    assert m.new_sa(crypto).hint is None


def test_struct_sizes_match_the_uapi_on_64_bit() -> None:
    sizes = (
        m.SELECTOR_LEN, m.USERSA_INFO_LEN, m.USERSA_ID_LEN, m.USERSPI_INFO_LEN, m.USERPOLICY_INFO_LEN,
        m.USERPOLICY_ID_LEN, m.USER_TMPL_LEN, m.USER_EXPIRE_LEN, m.USER_ACQUIRE_LEN, m.USER_POLEXPIRE_LEN,
    )  # fmt: skip
    assert sizes == (56, 224, 24, 232, 168, 64, 64, 232, 280, 176)
