"""What offload an SA or policy really got, from what we asked for and what the kernel reports back.

Crypto offload on a device without xfrmdev_ops (or whose driver answers EOPNOTSUPP) is accepted by the kernel
and silently runs in software: only a read-back shows it. Packet offload never falls back (the kernel refuses
the request), except on kernels older than 6.2, which do not know packet mode for policies and ignore it.
"""

from __future__ import annotations

import enum

from ipsec_bridge.xfrm.messages import Offload


class OffloadStatus(enum.StrEnum):
    NONE = "none"  # none requested
    CRYPTO = "crypto"  # the device encrypts/decrypts, the kernel does the rest
    PACKET = "packet"  # the device does the whole ESP processing
    FALLBACK = "fallback"  # requested, but the kernel runs it in software


def offload_status(requested: Offload | None, installed: Offload | None) -> OffloadStatus:
    """Compare the offload we requested with the XFRMA_OFFLOAD_DEV the kernel dumps for the same object."""
    if requested is None:
        if installed is None:
            return OffloadStatus.NONE
        return OffloadStatus.PACKET if installed.is_packet else OffloadStatus.CRYPTO
    if installed is None or installed.ifindex != requested.ifindex:
        return OffloadStatus.FALLBACK
    if requested.is_packet and not installed.is_packet:
        return OffloadStatus.FALLBACK
    return OffloadStatus.PACKET if installed.is_packet else OffloadStatus.CRYPTO
