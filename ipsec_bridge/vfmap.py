"""The VF map (`zt-bridge --vf-map FILE`): which SR-IOV virtual function carries which local pod.

On a DPU (BlueField) the bridge runs on the card's Arm cores and each host pod reaches the wire through
its own VF, whose representor (`pf0vf3`) the DPU sees. The VF is then the pod's identity on this node, the
way its address is elsewhere: only a pod whose VF we know may get a certificate and tunnels.

File format (YAML, a list; `[]` means "no VF assigned yet"):

    - vf: 3                      # VF index on the PF (required, >= 0)
      pod: shop/frontend         # NAMESPACE/NAME as in WDS
      ip: 10.1.0.10              # the pod's address as in WDS
      netdev: pf0vf3             # optional: the VF's representor, for the operator's eyes
    - vf: 5
      ip: 10.1.0.11              # `pod` or `ip` (or both) must be given

Semantics, when a VF map is configured (without one, nothing changes):
- a local mesh pod gets certificates and tunnels only if exactly one entry names it (by `pod` or `ip`), that
  entry agrees with WDS on everything it states (NAMESPACE/NAME and address), and no other entry claims the
  same VF; otherwise the pod gets no tunnel (default deny stays) and the reason shows in /config_dump
  (`state.vf.refused`), under the `ztctl tunnels` table and in the `zt_bridge_vf_refused_pods` metric;
- the VF shows in /config_dump and `ztctl tunnels` (column VF) for each tunnel of the pod, and labels the
  per-VF metrics (`zt_bridge_vf_pods{vf,pod}`, `zt_bridge_vf_sa_bytes|packets{vf,direction}`);
- pods of other nodes are untouched: their own bridges apply their own maps;
- the file is re-read when it changes; a bad file refuses the start with one line, and at runtime the last
  good map stays in force (the error is logged, counted and shown in /config_dump).

Not here (yet): a CNI source. Multus' `k8s.v1.cni.cncf.io/network-status` annotation names a pod's VF by
its PCI address (and, in newer device-info, its representor); reading it needs the Kubernetes API and the
PCI address -> VF index mapping of the host, so a node agent that has both writes this file instead
(atomically: write, then rename).

`parse` and `assign` are pure; `VfMapFile` is the only IO (a poll on the file, off the loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from ztcore.filewatch import Signature, signature

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
KEYS = ("vf", "pod", "ip", "netdev")


class VfMapError(ValueError):
    """A VF map file that cannot be used; the message is one readable line."""


@dataclass(frozen=True, slots=True)
class VfEntry:
    vf: int
    pod: str = ""  # NAMESPACE/NAME, or "" when the entry names the pod by address only
    ip: IPAddress | None = None
    netdev: str = ""

    def describe(self) -> str:
        parts = [f"VF {self.vf}"]
        if self.netdev:
            parts.append(f"({self.netdev})")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"vf": self.vf, "pod": self.pod or None, "ip": str(self.ip) if self.ip else None,
                "netdev": self.netdev or None}  # fmt: skip


@dataclass(frozen=True, slots=True)
class VfMap:
    entries: tuple[VfEntry, ...]


@dataclass(frozen=True, slots=True)
class VfVerdict:
    """One local pod under the VF map: its VF, or why it gets none."""

    pod: str
    ip: IPAddress
    entry: VfEntry | None  # set when the pod may have tunnels
    reason: str = ""  # set when it may not

    @property
    def ok(self) -> bool:
        return self.entry is not None


@dataclass(frozen=True, slots=True)
class Assignment:
    verdicts: Mapping[IPAddress, VfVerdict]
    unused: tuple[VfEntry, ...] = ()  # entries that name no local mesh pod (stale, or the pod is not up yet)

    def describe(self) -> dict[str, Any]:
        ordered = sorted(self.verdicts.values(), key=lambda v: (v.ip.version, int(v.ip)))
        return {
            "pods": {str(v.ip): {"pod": v.pod, "vf": v.entry.vf, "netdev": v.entry.netdev or None}
                     for v in ordered if v.entry is not None},
            "refused": [{"pod": v.pod, "ip": str(v.ip), "reason": v.reason} for v in ordered if v.entry is None],
            "unused": [e.to_json() for e in self.unused],
        }  # fmt: skip


# --- parsing (pure) ----------------------------------------------------------------------------------------------


def _entry(index: int, raw: object) -> VfEntry:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise VfMapError(f"{where}: expected a mapping with vf and pod/ip, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in KEYS)
    if unknown:
        raise VfMapError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    vf = raw.get("vf")
    if isinstance(vf, bool) or not isinstance(vf, int) or vf < 0:
        raise VfMapError(f"{where}: vf must be a VF index (an integer >= 0), got {vf!r}")
    pod = raw.get("pod")
    if pod is not None:
        ns, sep, name = str(pod).partition("/")
        if not isinstance(pod, str) or not sep or not ns or not name or "/" in name:
            raise VfMapError(f"{where}: pod {pod!r} is not NAMESPACE/NAME")
    ip = None
    if raw.get("ip") is not None:
        try:
            ip = ip_address(str(raw["ip"]))
        except ValueError:
            raise VfMapError(f"{where}: ip {raw['ip']!r} is not an IP address") from None
    if pod is None and ip is None:
        raise VfMapError(f"{where} (VF {vf}): give the pod as pod: NAMESPACE/NAME, ip: ADDRESS, or both")
    netdev = raw.get("netdev")
    if netdev is not None and (not isinstance(netdev, str) or not netdev or len(netdev) > 15 or "/" in netdev):
        raise VfMapError(f"{where}: netdev {netdev!r} is not an interface name")
    return VfEntry(vf, pod or "", ip, netdev or "")


def parse(text: str) -> VfMap:
    """The map in `text`; VfMapError (one line) when it is not a list of valid entries."""
    import yaml  # only with --vf-map: 1.4 MiB of a bridge's resident set otherwise

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise VfMapError(f"not YAML{where}: {problem}") from None
    if raw is None:
        # an empty file is more likely a writer caught mid-write than an intent: "no VFs" is `[]`
        raise VfMapError("the file is empty (write [] for a node with no VFs assigned)")
    if not isinstance(raw, list):
        raise VfMapError(f"expected a list of entries (- vf: N ...), got a {type(raw).__name__}")
    return VfMap(tuple(_entry(i, item) for i, item in enumerate(raw, start=1)))


# --- assignment (pure) -------------------------------------------------------------------------------------------


def assign(vf_map: VfMap, local_pods: Iterable[tuple[str, IPAddress]]) -> Assignment:
    """Which of this node's mesh pods (NAMESPACE/NAME, address as WDS holds them) may have tunnels."""
    pods = list(local_pods)
    by_vf: dict[int, list[VfEntry]] = {}
    for e in vf_map.entries:
        by_vf.setdefault(e.vf, []).append(e)
    used: set[int] = set()
    verdicts: dict[IPAddress, VfVerdict] = {}
    for name, ip in pods:
        mine = [(i, e) for i, e in enumerate(vf_map.entries) if e.pod == name or e.ip == ip]
        used.update(i for i, _ in mine)
        verdicts[ip] = _verdict(name, ip, [e for _, e in mine], by_vf)
    unused = tuple(e for i, e in enumerate(vf_map.entries) if i not in used)
    return Assignment(verdicts, unused)


def _verdict(name: str, ip: IPAddress, mine: list[VfEntry], by_vf: Mapping[int, list[VfEntry]]) -> VfVerdict:
    if not mine:
        return VfVerdict(name, ip, None, "no VF in the VF map names this pod")
    vfs = sorted({e.vf for e in mine})
    if len(vfs) > 1:
        return VfVerdict(name, ip, None, f"named by VFs {', '.join(map(str, vfs))}: a pod has exactly one VF")
    entry = mine[0]
    if len(by_vf[entry.vf]) > 1:
        claims = ", ".join(e.pod or str(e.ip) for e in by_vf[entry.vf])
        return VfVerdict(name, ip, None, f"VF {entry.vf} is claimed by {len(by_vf[entry.vf])} entries ({claims})")
    if entry.pod and entry.pod != name:
        return VfVerdict(name, ip, None, f"{entry.describe()} is for pod {entry.pod}, but WDS has {name} at {ip}")
    if entry.ip is not None and entry.ip != ip:
        return VfVerdict(name, ip, None, f"{entry.describe()} says {entry.ip}, but WDS has {name} at {ip}")
    return VfVerdict(name, ip, entry)


# --- the file (IO) -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class VfMapStatus:
    path: str
    entries: int = 0
    loaded_at: float = 0.0  # time.time() of the map in force
    digest: str = ""
    last_error: str = ""  # the newest bad version of the file; "" once a good one follows
    reloads: int = 0
    errors: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "entries": self.entries,
            "loaded_at": round(self.loaded_at, 3),
            "sha256": self.digest,
            "last_error": self.last_error,
            "reloads": self.reloads,
            "errors": self.errors,
        }


class VfMapFile:
    """Loads the map at start (VfMapError), then polls the file and hands each new good map to its listeners."""

    def __init__(self, path: Path, poll_interval: float = 0.5) -> None:
        self.path = path
        self._poll = poll_interval
        self.status = VfMapStatus(str(path))
        self.current: VfMap | None = None
        self._stamp: Signature | None = None
        self._listeners: list[Callable[[VfMap], object]] = []
        self._error_listeners: list[Callable[[str], object]] = []

    def subscribe(self, apply: Callable[[VfMap], object]) -> None:
        """Call `apply` with the map in force now and with every new good one."""
        self._listeners.append(apply)
        if self.current is not None:
            apply(self.current)

    def on_error(self, callback: Callable[[str], object]) -> None:
        self._error_listeners.append(callback)

    def _read(self) -> tuple[Signature, str]:
        stamp = signature([self.path])
        if stamp[0] is None:
            self.path.stat()  # raises the OSError that says why
        return stamp, self.path.read_text()

    async def load_initial(self) -> VfMap:
        try:
            stamp, text = await asyncio.to_thread(self._read)
        except OSError as err:
            raise VfMapError(f"--vf-map {self.path}: {err.strerror}") from None
        try:
            vf_map = parse(text)
        except VfMapError as err:
            raise VfMapError(f"--vf-map {self.path}: {err}") from None
        self._stamp = stamp
        self._accept(vf_map, text)
        return vf_map

    def _accept(self, vf_map: VfMap, text: str) -> None:
        self.status.entries = len(vf_map.entries)
        # wall time, not the tunnels' monotonic clock: it is shown to operators (dump, log), never compared
        self.status.loaded_at = time.time()
        self.status.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.status.last_error = ""
        self.current = vf_map
        for apply in self._listeners:
            apply(vf_map)

    async def check(self) -> bool:
        """One poll: True when a new good map was applied."""
        try:
            stamp, text = await asyncio.to_thread(self._read)
        except OSError as err:
            return self._reject(stamp=None, message=f"cannot read: {err.strerror}")
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if hashlib.sha256(text.encode()).hexdigest()[:16] == self.status.digest and not self.status.last_error:
            return False  # touched, not changed
        try:
            vf_map = parse(text)
        except VfMapError as err:
            return self._reject(stamp, str(err))
        self.status.reloads += 1
        self._accept(vf_map, text)
        log.info("--vf-map %s reloaded: %d entries", self.path, len(vf_map.entries))
        return True

    def _reject(self, stamp: Signature | None, message: str) -> bool:
        if message != self.status.last_error:  # once per bad version, not once per poll
            self.status.errors += 1
            self.status.last_error = message
            for callback in self._error_listeners:
                callback(message)
            since = time.strftime("%H:%M:%S", time.localtime(self.status.loaded_at))
            log.error("--vf-map %s: %s; keeping the map loaded at %s (%d entries)", self.path, message, since,
                      self.status.entries)  # fmt: skip
        if stamp is None:
            self._stamp = None  # read again once the file is back
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            await self.check()
