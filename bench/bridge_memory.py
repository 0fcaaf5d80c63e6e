"""Where a bridge's memory goes, each figure beside its peer measured in the same run (host, no kernel needed).

    .venv/bin/python bench/bridge_memory.py [--sas 4000] [--workloads 10000] [--rows 2000] [--rounds 5] [--json]

- SA dump: what the idle check, /config_dump and /metrics read from a dump of every SA. Decoding each SA whole
  (`decode_sas`) beside reading its counters only (`decode_sas_counters`): milliseconds (median of `rounds`) and
  the memory the result holds (tracemalloc).
- The view: `workloads` Address resources (as ztd sends them, 20 namespaces' worth of repeated strings) applied to
  a `StateStore`, with `Workload.from_pb` interning its repeated fields, and beside it with interning turned off
  for the run (tracemalloc of what the store holds).
- /config_dump: `rows` tunnel-sized rows rendered as one `json.dumps(indent=2)` document, beside `json_chunks`
  writing them as they are made (tracemalloc peak while rendering).
- Imports: the resident set of a fresh interpreter after `import ipsec_bridge.main`, beside the same with the
  `--config-dir` source (`ipsec_bridge.local_source`) imported too, which the bridge now loads only with that flag.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from google.protobuf import any_pb2  # noqa: E402

import ztcore.model.workload as workload_model  # noqa: E402
from ipsec_bridge.admin import json_chunks  # noqa: E402
from ipsec_bridge.state import StateStore, ViewSettings  # noqa: E402
from ipsec_bridge.xfrm import messages as m  # noqa: E402
from ipsec_bridge.xfrm.consts import XfrmMsg  # noqa: E402
from protos.istio.workload import workload_pb2 as pb  # noqa: E402
from ztcore.xds import typeurls  # noqa: E402

MIB = 1 << 20


def held(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn's result, the MiB it still holds once returned, and the peak while it ran (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        gc.collect()
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, now / MIB, peak / MIB


def timed(fn: Callable[[], Any], rounds: int) -> float:
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(runs), 1)


def sa_dump(count: int, rounds: int) -> dict[str, Any]:
    sel = m.Selector.of("10.1.0.1/32", "10.2.0.1/32")
    node_b, node_a = ip_address("192.168.50.2"), ip_address("192.168.50.1")
    sa = m.SecurityAssociation(node_b, node_a, 0x1000, m.Aead(bytes(32), bytes(4)), sel, mark=m.Mark(16, 255))
    payload = m.encode_sa(sa)
    messages = [m.NetlinkMessage(XfrmMsg.NEWSA, 0, 0, 0, payload) for _ in range(count)]
    out: dict[str, Any] = {"sas": count}
    decoders: tuple[tuple[str, Callable[[list[m.NetlinkMessage]], list[Any]]], ...] = (
        ("whole", m.decode_sas),
        ("counters", m.decode_sas_counters),
    )
    for name, decode in decoders:
        _, kept, _ = held(functools.partial(decode, messages))
        out[name] = {"ms": timed(functools.partial(decode, messages), rounds), "held_mib": round(kept, 2)}
    return out


def address(i: int) -> any_pb2.Any:
    w = pb.Workload(
        uid=f"Kubernetes//Pod/apps-{i % 20}/pod-{i}", name=f"pod-{i}", namespace=f"apps-{i % 20}",
        addresses=[bytes([10, 1 + i // 62500, (i // 250) % 250, i % 250 + 1])], network="net-1",
        trust_domain="cluster.local", service_account=f"account-{i % 98}", node=f"node-{i % 50}",
        canonical_name=f"app-{i % 98}", canonical_revision="v1", workload_name=f"pod-{i}", cluster_id="Kubernetes",
    )  # fmt: skip
    packed = any_pb2.Any()
    packed.Pack(pb.Address(workload=w))
    return packed


def view(count: int) -> dict[str, Any]:
    upserts = [(f"apps/pod-{i}", address(i)) for i in range(count)]
    settings = ViewSettings.parse(["10.0.0.0/8"], "cluster.local", "istio-system/ztunnel")
    out: dict[str, Any] = {"workloads": count}
    names = vars(workload_model)  # the peer: from_pb's `sys.intern` made a no-op for the run
    real_sys = names["sys"]
    for name, module in (("interned", real_sys), ("not_interned", types.SimpleNamespace(intern=lambda s: s))):
        names["sys"] = module
        try:
            store, kept, _ = held(lambda: _applied(settings, upserts))
        finally:
            names["sys"] = real_sys
        assert len(store.view.pods_by_ip) == count
        out[name] = {"held_mib": round(kept, 2)}
    return out


def _applied(settings: ViewSettings, upserts: list[tuple[str, any_pb2.Any]]) -> StateStore:
    store = StateStore(settings)
    store.expect_types([typeurls.ADDRESS])
    store.apply_resources(typeurls.ADDRESS, upserts, [])
    return store


def row(i: int) -> dict[str, Any]:
    """About what `/config_dump` writes per tunnel (ipsec_bridge/tunnels/view.py: tunnel_row)."""
    return {
        "key": f"pod/10.1.0.{i % 250}/10.2.{i // 250}.{i % 250}", "scope": "pod", "role": "initiator",
        "local": f"client-{i}", "local_address": f"10.1.0.{i % 250}", "local_identity": "spiffe://cluster.local/ns/apps/sa/client-0",
        "peer": f"server-{i}", "peer_address": f"10.2.{i // 250}.{i % 250}", "peer_identity": "spiffe://cluster.local/ns/apps/sa/server-0",
        "peer_node": "node-b", "local_node_address": "192.168.50.1", "peer_node_address": "192.168.50.2", "pairs": 1,
        "state": "up", "origin": "handshake", "last_error": "", "retiring_spis": [],
        "history": [{"generation": 1, "reason": "new", "at": "2026-12-03T07:00:00+00:00"}], "origin_setup": "acquire",
        "generation": 1, "reqid": f"0x{0x10000 + i:08x}", "spi_in": f"0x{0x2000 + i:08x}",
        "spi_out": f"0x{0x9000 + i:08x}",
        "key_bits": 128, "esn": True, "established": "2026-12-03T07:00:00+00:00", "age_seconds": 12.5,
        "expires": "2026-12-04T07:00:00+00:00", "handshake_ms": 11.2, "offload": "none", "bytes_in": 1234,
        "packets_in": 12, "bytes_out": 4321, "packets_out": 13, "next_rekey_seconds": 3500.0, "activity": "active",
        "idle_seconds": 0.4, "vf": None,
    }  # fmt: skip


def config_dump(count: int) -> dict[str, Any]:
    def rows() -> Iterator[dict[str, Any]]:
        return (row(i) for i in range(count))

    def whole() -> int:
        return len(json.dumps({"node": "node-a", "tunnels": list(rows())}, indent=2).encode())

    def streamed() -> int:
        return sum(len(chunk) for chunk in json_chunks({"node": "node-a", "tunnels": rows()}))

    out: dict[str, Any] = {"rows": count}
    for name, fn in (("one_document", whole), ("streamed", streamed)):
        size, _, peak = held(fn)
        out[name] = {"peak_mib": round(peak, 2), "bytes": size}
    assert out["one_document"]["bytes"] == out["streamed"]["bytes"]
    return out


IMPORT_RSS = """
import sys
{imports}
with open("/proc/self/status") as f:
    rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024
print(round(rss, 1), int("yaml" in sys.modules), int("ztcore.mesh.translate" in sys.modules))
"""


def imports() -> dict[str, Any]:
    out: dict[str, Any] = {}
    cases = (("bridge", "import ipsec_bridge.main"),
             ("bridge_with_local_source", "import ipsec_bridge.main, ipsec_bridge.local_source"))  # fmt: skip
    for name, imports in cases:
        done = subprocess.run([sys.executable, "-c", IMPORT_RSS.format(imports=imports)], capture_output=True,
                              text=True, check=True, cwd=REPO, timeout=120)  # fmt: skip
        rss, yaml, translate = done.stdout.split()
        out[name] = {"rss_mib": float(rss), "yaml": bool(int(yaml)), "translator": bool(int(translate))}
    return out


def report(r: dict[str, Any]) -> str:
    s, v, c, i = r["sa_dump"], r["view"], r["config_dump"], r["imports"]
    return "\n".join([
        f"SA dump of {s['sas']:,} SAs: whole {s['whole']['ms']} ms, holds {s['whole']['held_mib']} MiB | counters only"
        f" {s['counters']['ms']} ms, holds {s['counters']['held_mib']} MiB",
        f"view of {v['workloads']:,} workloads: interned {v['interned']['held_mib']} MiB | not interned"
        f" {v['not_interned']['held_mib']} MiB",
        f"/config_dump of {c['rows']:,} rows ({c['streamed']['bytes']:,} bytes): one document peak"
        f" {c['one_document']['peak_mib']} MiB | streamed peak {c['streamed']['peak_mib']} MiB",
        f"imports: zt-bridge {i['bridge']['rss_mib']} MiB RSS (yaml {i['bridge']['yaml']}, translator"
        f" {i['bridge']['translator']}) | with the --config-dir source {i['bridge_with_local_source']['rss_mib']} MiB",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sas", type=int, default=4000)
    parser.add_argument("--workloads", type=int, default=10000)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.sas, args.workloads, args.rows, args.rounds) < 1 or args.workloads > 250_000:
        print("bridge_memory: --sas, --rows and --rounds must be positive, --workloads 1..250000", file=sys.stderr)
        return 2
    results = {"sa_dump": sa_dump(args.sas, args.rounds), "view": view(args.workloads),
               "config_dump": config_dump(args.rows), "imports": imports()}  # fmt: skip
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
