"""XFRM sample messages, shared by the message goldens (tests/unit/test_xfrm_messages.py) and the netlink socket
tests (tests/unit/test_xfrm_netlink.py): one IPv4 SA and one IPv4 policy as models, and the bytes Linux sends back.

The hex is hand-written from the x86_64 layouts in include/uapi/linux/xfrm.h, never produced by our encoder, so
the goldens that use it check the encoder rather than repeat it.
"""

from __future__ import annotations

from ipaddress import ip_address

from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import PolicyDir


def hx(text: str) -> bytes:
    """Hex with spaces, newlines and `#` comments allowed."""
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    return bytes.fromhex("".join("".join(lines).split()))


Z4 = "00000000"
Z12 = Z4 * 3
Z16 = Z4 * 4
KEY16 = bytes(range(16))
KEY32 = bytes(range(0x20, 0x40))
SALT = bytes.fromhex("a1a2a3a4")

# --- building blocks (hex, hand-written) --------------------------------------------------------------------------

SEL_V4 = f"""
  0a020000 {Z12}            # daddr 10.2.0.0
  0a010000 {Z12}            # saddr 10.1.0.0
  0000 0000 0000 0000       # dport dport_mask sport sport_mask
  0200                      # family AF_INET
  18 18 00                  # prefixlen_d 24, prefixlen_s 24, proto any
  000000                    # pad
  00000000 00000000         # ifindex, user
"""
SEL_V6 = """
  fd000000 00020000 00000000 00000000   # daddr fd00:0:2::
  fd000000 00010000 00000000 00000000   # saddr fd00:0:1::
  0000 0000 0000 0000
  0a00                                  # family AF_INET6
  40 40 00                              # /64 /64
  000000
  00000000 00000000
"""
INF8 = "ffffffffffffffff"
LFT_DEFAULT = f"{INF8} {INF8} {INF8} {INF8} " + "0000000000000000" * 4  # bytes/packets INF, no time limits
LFT_SA = """
  e803000000000000 d007000000000000     # soft/hard bytes 1000 / 2000
  0a00000000000000 1400000000000000     # soft/hard packets 10 / 20
  1e00000000000000 3c00000000000000     # soft/hard add seconds 30 / 60
  0000000000000000 0000000000000000     # soft/hard use seconds
"""
CURLFT_ZERO = "00" * 32
STATS_ZERO = "00" * 12
AEAD_NAME = "726663343130362867636d286165732929" + "00" * 47  # "rfc4106(gcm(aes))" NUL-padded to 64 bytes

SA_V4_INFO = f"""
  {SEL_V4}
  c0000202 {Z12} 00001001 32 000000      # id: daddr 192.0.2.2, spi 0x1001 (network order), proto ESP, pad
  c0000201 {Z12}                          # saddr 192.0.2.1
  {LFT_SA}
  {CURLFT_ZERO} {STATS_ZERO}
  00000000 07000000                       # seq 0, reqid 7
  0200 01 00 80                           # family AF_INET, mode tunnel, replay_window 0 (in ESN attr), flags ESN
  00000000000000                          # pad to 224
"""


def sa_v4() -> m.SecurityAssociation:
    return m.SecurityAssociation(
        src=ip_address("192.0.2.1"),
        dst=ip_address("192.0.2.2"),
        spi=0x1001,
        aead=m.Aead(KEY16, SALT),
        selector=m.Selector.of("10.1.0.0/24", "10.2.0.0/24"),
        reqid=7,
        replay_window=128,
        esn=True,
        lifetime=m.Lifetime(1000, 2000, 10, 20, 30, 60),
        mark=m.Mark(0x10, 0xFF),
        output_mark=m.Mark(0xD00, 0xF00),
    )


def policy_v4() -> m.Policy:
    return m.Policy(
        selector=m.Selector.of("10.1.0.0/24", "10.2.0.0/24"),
        direction=PolicyDir.OUT,
        priority=100,
        templates=(m.Template(ip_address("192.0.2.1"), ip_address("192.0.2.2"), reqid=7),),
        mark=m.Mark(0x10, 0xFF),
    )


def kernel_sa_v4_payload() -> bytes:
    """A NEWSA dump entry as Linux 6.1 builds it: counters filled in, LASTUSED with its PAD, no SET_MARK."""
    info = bytearray(hx(SA_V4_INFO))
    info[160:192] = hx("4000000000000000 0200000000000000 1027000000000000 2027000000000000")  # curlft
    info[192:204] = hx("80000000 01000000 02000000")  # stats: replay_window 128, replay 1, integrity_failed 2
    return bytes(info) + hx(f"""
      6000 1200 {AEAD_NAME} a0000000 80000000 000102030405060708090a0b0c0d0e0f a1a2a3a4
      2c00 1700 04000000 05000000 07000000 00000000 00000000 80000000 7f000000 {Z12}  # oseq 5, seq 7, bitmap
      0400 1b00                             # XFRMA_PAD (aligns the u64 that follows)
      0c00 0f00 3930000000000000            # XFRMA_LASTUSED 12345
      0c00 1500 10000000 ff000000
      0800 1d00 000d0000 0800 1e00 000f0000
      0800 ff00 00000000                    # an attribute from a newer kernel: ignored
    """)
