"""What offload an SA or policy really got, from what we asked for and what the kernel reports back.

Crypto offload on a device without xfrmdev_ops (or whose driver answers EOPNOTSUPP) is accepted by the kernel
and silently runs in software: only a read-back shows it. Packet offload never falls back (the kernel refuses
the request), except on kernels older than 6.2, which do not know packet mode for policies and ignore it.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True, slots=True)
class OffloadProbe:
    """What the kernel made of one throwaway SA with the bridge's offload settings (checked once at start)."""

    mode: str  # none | crypto | packet, as configured
    device: str
    status: OffloadStatus | None  # None: the kernel refused the SA
    error: str = ""
    esn: bool = True  # whether the probe SA had 64-bit sequence numbers
    # the kernel refused it only because the driver cannot offload ESN SAs (it has no xdo_dev_state_advance_esn)
    esn_refused: bool = False

    @property
    def usable(self) -> bool:
        """Whether tunnels can come up: packet mode never runs in software, so a refusal keeps them down."""
        return self.status is not None

    def describe(self) -> str:
        if self.status is None:
            return (f"--offload {self.mode} on {self.device}: the kernel refuses it: {self.error}; tunnels stay "
                    "down (no software fallback) and mesh traffic stays blocked")  # fmt: skip
        if self.status is OffloadStatus.FALLBACK:
            return f"--offload {self.mode} on {self.device}: the kernel accepts it but runs the SAs in software"
        without_esn = (" without ESN (the driver cannot offload it): 32-bit sequence numbers, which the SAs' hard "
                       "packet limit ends before they could wrap") if not self.esn else ""  # fmt: skip
        takes = f"the device takes the SAs ({self.status.value} offload)"
        return f"--offload {self.mode} on {self.device}: {takes}{without_esn}"
