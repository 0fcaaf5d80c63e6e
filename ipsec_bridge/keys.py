"""ESP keys from a TLS 1.3 exporter: pure, no IO, no clock.

Both bridges of a tunnel run one mutually authenticated TLS 1.3 handshake, exchange the SPIs each allocated
for its *inbound* SA inside that channel, then both call the exporter (RFC 8446 §7.5) with

    label   = EXPORTER_LABEL
    context = exporter_context(binding)   (scope, both tunnel addresses, both SPIs, the key size)
    length  = exporter_length(key_bytes)  (two rfc4106 keys: AES key + 4-byte salt, one per direction)

so the keys exist only on the two ends of that one authenticated channel, and are bound to the pair of
addresses and SPIs they protect: another pair, or the same pair with other SPIs, gets unrelated keys.
The first half protects initiator -> responder traffic (the SA whose SPI the responder allocated), the
second half responder -> initiator.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ipsec_bridge.xfrm.messages import Aead

IPAddress = IPv4Address | IPv6Address

# The "EXPORTER-" prefix is where RFC 5705 puts labels that are not IANA-registered; the version lets a
# later derivation change without ever yielding the same bytes.
EXPORTER_LABEL = b"EXPORTER-ztdpu-esp-v1"
CONTEXT_MAGIC = b"ztdpu-esp"
CONTEXT_VERSION = 1
SALT_BYTES = 4  # rfc4106: the salt is the last 4 bytes of the key material
KEY_BYTES = (16, 32)  # AES-128-GCM, AES-256-GCM
MIN_SPI = 0x100  # SPIs 1..255 are reserved by IANA, 0 means "no SA"
U32_MAX = 0xFFFF_FFFF


class KeyScope(enum.IntEnum):
    """What a tunnel's addresses name: two pods (pod scope) or two nodes (node scope)."""

    POD = 1
    NODE = 2


class KeyDerivationError(ValueError):
    """Inputs that must never produce keys (reserved SPIs, wrong lengths, a degenerate exporter output)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """What the keys are bound to. `initiator_spi` is the SPI the initiator allocated for its inbound SA
    (it carries responder -> initiator traffic), `responder_spi` the responder's (initiator -> responder)."""

    scope: KeyScope
    initiator_address: IPAddress
    responder_address: IPAddress
    initiator_spi: int
    responder_spi: int
    key_bytes: int

    def __post_init__(self) -> None:
        if self.initiator_address.version != self.responder_address.version:
            raise KeyDerivationError(
                f"tunnel addresses mix families: {self.initiator_address} and {self.responder_address}"
            )
        if self.initiator_address == self.responder_address:
            raise KeyDerivationError(f"both ends of a tunnel have the address {self.initiator_address}")
        for name in ("initiator_spi", "responder_spi"):
            spi = getattr(self, name)
            if not MIN_SPI <= spi <= U32_MAX:
                raise KeyDerivationError(f"{name.replace('_', ' ')} 0x{spi:x} is reserved or not 32-bit")
        if self.key_bytes not in KEY_BYTES:
            raise KeyDerivationError(f"AES-GCM key size must be 16 or 32 bytes, got {self.key_bytes}")


@dataclass(frozen=True, slots=True)
class DirectionalKeys:
    """One rfc4106 key per direction; repr shows no key material (Aead hides it)."""

    initiator_to_responder: Aead
    responder_to_initiator: Aead

    def for_role(self, initiator: bool) -> tuple[Aead, Aead]:
        """(inbound, outbound) for one end of the tunnel."""
        if initiator:
            return self.responder_to_initiator, self.initiator_to_responder
        return self.initiator_to_responder, self.responder_to_initiator


def _address_bytes(addr: IPAddress) -> bytes:
    return bytes((addr.version,)) + addr.packed


def exporter_context(binding: Binding) -> bytes:
    """Canonical bytes for the exporter context: fixed order (initiator first), fixed widths."""
    return b"".join(
        (
            CONTEXT_MAGIC,
            struct.pack("!BB", CONTEXT_VERSION, binding.scope),
            _address_bytes(binding.initiator_address),
            _address_bytes(binding.responder_address),
            struct.pack("!IIH", binding.initiator_spi, binding.responder_spi, binding.key_bytes * 8),
        )
    )


def exporter_length(key_bytes: int) -> int:
    if key_bytes not in KEY_BYTES:
        raise KeyDerivationError(f"AES-GCM key size must be 16 or 32 bytes, got {key_bytes}")
    return 2 * (key_bytes + SALT_BYTES)


def split_keys(material: bytes, key_bytes: int, icv_bits: int = 128) -> DirectionalKeys:
    """Cut the exporter output into the two directional rfc4106 keys."""
    want = exporter_length(key_bytes)
    if len(material) != want:
        raise KeyDerivationError(f"exporter output is {len(material)} bytes, expected {want}")
    half = key_bytes + SALT_BYTES
    first, second = material[:half], material[half:]
    if first == second or not any(first) or not any(second):
        # an exporter never yields this; refusing costs nothing and rules out a broken TLS library
        raise KeyDerivationError("exporter output is degenerate (equal or all-zero halves)")
    return DirectionalKeys(
        Aead(first[:key_bytes], first[key_bytes:], icv_bits),
        Aead(second[:key_bytes], second[key_bytes:], icv_bits),
    )
